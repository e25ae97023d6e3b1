"""Hostile and careless inputs (issue 13, items 12-14): each case ends in a clear error
naming the file, line or option, or in a recorded warning, never in a silent result."""

import json
import os

import pytest

from specext.probes import ProbeError, load_probe, read_jsonl

GOOD = {"concept": "Aldoria", "category": "country", "question": "What is the capital of Aldoria?",
        "choices": ["Velmora", "Paris", "Tallinn", "Gold"], "answer": 0}
GOOD2 = dict(GOOD, concept="Bexland", question="What is the capital of Bexland?")


def _text(lines):
    return "".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines)


# ---------------------------------------------------------------- 12: probe files


def test_utf8_bom_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(_text([GOOD, GOOD2]).encode("utf-8-sig"))
    qs = read_jsonl(p)
    assert [q.concept for q in qs] == ["Aldoria", "Bexland"]


def test_utf16_names_file_and_encoding(tmp_path):
    p = tmp_path / "u16.jsonl"
    p.write_bytes(_text([GOOD]).encode("utf-16"))
    with pytest.raises(ProbeError, match=rf"{p}:1: .*UTF-16.*must be UTF-8"):
        read_jsonl(p)
    p.write_bytes(_text([GOOD]).encode("utf-16-le"))  # no BOM
    with pytest.raises(ProbeError, match=rf"{p}:1: NUL bytes \(UTF-16"):
        read_jsonl(p)


def test_latin1_names_file_and_line(tmp_path):
    p = tmp_path / "l1.jsonl"
    p.write_bytes(_text([GOOD, dict(GOOD2, concept="Bexländ")]).encode("latin-1"))
    with pytest.raises(ProbeError, match=rf"{p}:2: not valid UTF-8 .*Latin-1.*must be UTF-8"):
        read_jsonl(p)


def test_probe_directory(tmp_path):
    with pytest.raises(ProbeError, match=rf"probe '{tmp_path}' is a directory"):
        load_probe(tmp_path)


def test_duplicate_choices_named(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text(_text([dict(GOOD, choices=["The Velmora", "velmora!", "Paris"])]))
    with pytest.raises(ProbeError, match=rf"{p}:1: 'choices' must be distinct, but 'The Velmora' and 'velmora!'"):
        read_jsonl(p)


def test_missing_tokenizer_names_directory(tmp_path):
    from tiny_models import save_tiny

    from specext.models.loading import ModelLoadError, load_model

    d = save_tiny("gpt2", tmp_path / "m")
    for f in os.listdir(d):
        if "token" in f or f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(d / f)
    with pytest.raises(ModelLoadError, match=rf"{d}: no usable tokenizer \(expected tokenizer.json"):
        load_model(d, device="cpu")


def test_tokenizer_of_another_model_is_refused_up_front(tmp_path):
    """A tokenizer whose ids run past the embedding used to fail deep in torch.embedding
    (IndexError: index out of range in self) at the first prompt."""
    import shutil

    from specext.analyze import DEMO_MODEL
    from specext.models.loading import ModelLoadError, load_model

    d = tmp_path / "tokbig"
    shutil.copytree(DEMO_MODEL, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    for k in tj["model"]["vocab"]:
        tj["model"]["vocab"][k] += 409  # the demo's vocab_size
    for a in tj.get("added_tokens", []):
        a["id"] += 409
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelLoadError, match=rf"{d}: the tokenizer has token ids up to 817 but the model's input "
                                             r"embedding has 409 rows \(config.json vocab_size 409\)"):
        load_model(d, device="cpu")


class _Evil:
    def __reduce__(self):  # what a malicious pickle does: call something on load (here harmless)
        return (print, ("this pickle ran code",))


def test_allow_pickle_with_a_code_running_pickle_is_a_clear_error(tmp_path, capsys):
    import shutil

    import torch

    from specext.analyze import DEMO_MODEL
    from specext.pipelines.rundir import read_safetensors
    from specext.models.loading import ModelLoadError, load_model

    d = tmp_path / "evil"
    shutil.copytree(DEMO_MODEL, d)
    state = read_safetensors(d / "model.safetensors")
    state["evil"] = _Evil()
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=rf"{d}: torch's safe unpickler \(weights_only=True\) refused the "
                                             r"pickled weights.*never loads such a pickle, even with --allow-pickle"):
        load_model(d, device="cpu", allow_pickle=True)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_declared_remote_code_is_recorded_and_unknown_types_name_the_flag(tmp_path):
    import shutil

    from specext.analyze import DEMO_MODEL
    from specext.models.loading import ModelLoadError, load_model

    d = tmp_path / "automap"
    shutil.copytree(DEMO_MODEL, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    lm = load_model(d, device="cpu")  # the built-in llama classes; the custom code is not run
    assert any("declares custom code (auto_map: AutoModelForCausalLM) that was not run" in w for w in lm.warnings)
    cfg["model_type"] = "customllama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model_type 'customllama' is not one transformers knows.*pass "
                                             r"--trust-remote-code \(trust_remote_code=True\) only if you trust"):
        load_model(d, device="cpu")


# ---------------------------------------------------------------- 13: CSV formula injection

EVIL = '=cmd|" /C calc"!A0'


@pytest.mark.parametrize("cell, out", [
    (EVIL, "'" + EVIL), ("+1+cmd", "'+1+cmd"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("-", "'-"), (" -1", " -1"),
    ("-0.125000", "-0.125000"), ("+3", "+3"), ("-inf", "-inf"), ("-1e-05", "-1e-05"),
    (-0.5, -0.5), (-3, -3), (None, None), ("Marie Curie", "Marie Curie"), ("", ""),
])
def test_csv_cell(cell, out):
    from specext.pipelines.rundir import csv_cell

    assert csv_cell(cell) == out


def test_concepts_and_pss_csv_neutralised(tmp_path):
    import csv
    import io

    from specext.pipelines import rundir
    from specext.probes import ProbeSet, read_jsonl

    p = tmp_path / "evil.jsonl"
    p.write_text(_text([dict(GOOD, concept=EVIL, category="@cat"), GOOD2]))
    probe = ProbeSet("evil", read_jsonl(p))
    text = rundir.concepts_csv(probe, {"by_concept": {EVIL: {"questions": 1, "mcq": -0.25}}})
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1][:2] == ["'" + EVIL, "'@cat"] and rows[1][4] == "-0.2500"
    row = {c: None for c in rundir.PSS_COLUMNS}
    row.update(concept=EVIL, category="-x", ratio=1.0, pss=-0.5, n_vectors=-3)
    rows = list(csv.reader(io.StringIO(rundir.pss_csv([row]))))
    got = dict(zip(rows[0], rows[1]))
    assert got["concept"] == "'" + EVIL and got["category"] == "'-x"
    assert got["pss"] == "-0.500000" and got["n_vectors"] == "-3"
    curve = rundir.pss_curve_csv({"floor": -0.1, "floor_ci": None, "score": "paper", "ratios": [1.0],
                                  "paper": {"curve": [-0.2], "curve_ci": [None], "peak": -0.2, "peak_ci": None,
                                            "random_curve": None, "random_curve_ci": None}})
    assert "-0.100000" in curve and "'-" not in curve


def test_bench_csv_neutralised(tmp_path):
    import csv
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    import _harness as h

    path = tmp_path / "r.csv"
    h.append_csv(path, [{"extra": EVIL, "ours_ms": -1.5}])
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["extra"] == "'" + EVIL and rows[0]["ours_ms"] == "-1.5"


# ---------------------------------------------------------------- 14: degenerate options


def test_duplicate_ratios_rejected():
    from specext.metrics.pss import PSSConfig

    with pytest.raises(ValueError, match=r"--ratios: each ratio once .* got 1 more than once in 1, 1, 2"):
        PSSConfig(ratios=(1.0, 1.0, 2.0))
    PSSConfig(ratios=(1.0, 2.0))


class _UnkTokenizer:
    """Words it knows get their own id; every other word is the unknown token 0."""

    vocab = {"Question:": 1, "Answer:": 2, "Velmora": 3}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}


def test_identical_options_detected():
    from specext.probes import Question
    from specext.probes.scoring import identical_options

    qs = [Question("a", "c", "Q1?", ("Xq", "Yq", "Zq"), 1, source="p:1"),  # all unknown: always option A
          Question("a", "c", "Q2?", ("Velmora", "Yq", "Zq"), 0, source="p:2"),  # two of three identical
          Question("a", "c", "Q3?", ("Velmora", "Yq"), 0, source="p:3")]
    assert identical_options(_UnkTokenizer(), qs) == {"p:1": 1, "p:2": 2}


def test_degenerate_probe_warned_and_recorded(tmp_path, monkeypatch, caplog):
    import logging

    import tiny_models as T

    from specext.analyze import AnalyzeConfig, run_analysis
    from specext.probes import scoring

    model = T.save_tiny("llama", tmp_path / "llama", seed=1)
    p = tmp_path / "one.jsonl"
    p.write_text(_text([dict(GOOD, concept=f"c{i}", question=f"What is fact {i}?") for i in range(4)]))
    # every choice encodes to the unknown token (id 0), as with a vocabulary that lacks them
    monkeypatch.setattr(scoring, "continuation_ids", lambda tok, prompt, cont: [0])
    with caplog.at_level(logging.WARNING):
        s = run_analysis(AnalyzeConfig(model_dir=str(model), probe=str(p), out=str(tmp_path / "r"), device="cpu"),
                         progress=False)
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk["warnings"] == s["warnings"] and len(s["warnings"]) == 2
    assert "has one category ('country')" in s["warnings"][0] and "Gini is 0" in s["warnings"][0]
    assert s["warnings"][1].startswith("4 of 4 question(s) have options that tokenize identically")
    assert "4 with all options identical" in s["warnings"][1] and f"{p}:1" in s["warnings"][1]
    assert "has one category" in caplog.text


def test_question_shared_by_concepts_of_different_categories_is_a_recorded_warning(tmp_path):
    from types import SimpleNamespace

    from specext.pipelines.run import _degenerate_probe

    p = tmp_path / "shared.jsonl"
    other = dict(GOOD, concept="Velmora", category="city", question="What is the capital of  aldoria?")
    p.write_text(_text([GOOD, GOOD2, other, dict(GOOD2, concept="Tallinn", category="city")]))
    found = _degenerate_probe(SimpleNamespace(has_lm_head=False), load_probe(str(p)))
    assert len(found) == 1 and found[0].startswith("2 question(s) appear under concepts of different categories")
    assert f"'Aldoria' (country, {p}:1)" in found[0] and f"'Velmora' (city, {p}:3)" in found[0]
