"""End-to-end runs of python -m specext.analyze on tiny local models."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_models as T
from specext import analyze
from specext.analyze import AnalyzeConfig, main, run_analysis
from specext.probes import Question, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def make_probe(path, n_cats=3, n_concepts=3, n_q=4, tiers=("high", "medium", "low")):
    qs = []
    words = ["Velmora", "Paris", "Tallinn", "Gold", "Estonia", "Physics"]
    for k in range(n_cats):
        cat = ["country", "river", "person", "element"][k]
        for c in range(n_concepts):
            for j in range(n_q):
                ch = [words[(j + i) % len(words)] for i in range(4)]
                qs.append(Question(f"{cat}{c}", cat, f"What is fact {j} of the {cat} number {c}?", tuple(ch), j % 4,
                                   tier=tiers[c % 3], aliases=(ch[j % 4].lower(),)))
    write_jsonl(qs, path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return T.save_tiny("llama", tmp_path_factory.mktemp("m") / "llama", seed=1)


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    return make_probe(tmp_path_factory.mktemp("p") / "probe.jsonl")


def run_cli(args, kill_at=None):
    """``python -m specext.analyze ARGS`` in a subprocess; ``kill_at=(stage, n)`` SIGKILLs it
    right after that checkpoint (tests/kill_at_checkpoint.py)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = ["-m", "specext.analyze"] if kill_at is None else [str(ROOT / "tests" / "kill_at_checkpoint.py"),
                                                               kill_at[0], str(kill_at[1]), "--"]
    return subprocess.run([sys.executable, *cmd, *map(str, args)], capture_output=True, text=True, env=e, cwd=ROOT)


def read_run(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("seconds")
    return summary, load_file(str(out / "neurons.safetensors")), (out / "questions.jsonl").read_text()


def test_end_to_end(tmp_path, llama_dir, probe_file):
    out = tmp_path / "run"
    rc = main([str(llama_dir), "--probe", str(probe_file), "--out", str(out), "--device", "cpu", "--batch-size", "5",
               "--chunk-size", "7", "-q"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "summary.json", "neurons.safetensors", "mass.safetensors", "concepts.csv", "report.html",
            "questions.jsonl", "gini_by_layer.png", "norm_entropy_hist.png", "layer_category_mass.png",
            "accuracy.png", "pss.csv", "pss_layers.json", "pss_curve.png", "pss_groups.png", "pss_layers.png"} <= names
    assert ".state" not in names
    s = json.loads((out / "summary.json").read_text())
    assert set(s["accuracy"]) >= {"mcq", "mcq_norm", "open"} and 0 <= s["accuracy"]["mcq"] <= 1
    assert set(s["neurons"]) >= {"mean_gini", "median_gini", "mean_norm_entropy", "dead"}
    assert len(s["layers"]) == 2 and s["probe"]["questions"] == 36
    n = load_file(str(out / "neurons.safetensors"))
    for k in ("gini", "entropy", "norm_entropy", "top_category", "total", "top_share", "value_norms"):
        assert n[k].shape == (2, 48), k
    assert (n["gini"] >= 0).all() and (n["gini"] <= 1 - 1 / 3 + 1e-6).all()
    rows = (out / "concepts.csv").read_text().splitlines()
    assert rows[0] == "concept,category,tier,questions,mcq,mcq_norm,open" and len(rows) == 10
    html = (out / "report.html").read_text()
    assert html.count("<img") == 8 and "Parameter Specialization Score" in html and "floor" in html
    assert "Specialisation against its controls" in html
    p = s["pss"]
    assert p["ratios"] == [0.1, 0.5, 1.0, 2.0, 5.0, 10.0] and len(p["random_curve"]) == 6
    assert p["denominator"] == "overall" and p["overall_accuracy"] == s["accuracy"]["mcq"] and p["score"] == "paper"
    for sc in ("paper", "delta"):
        b = p[sc]
        for key in ("curve", "random_curve"):
            for v, ci in zip(b[key], b[key + "_ci"]):
                assert ci[0] <= v <= ci[1], (sc, key)
        assert b["peak_ci"][0] <= b["peak"] + 1e-12 and b["peak_ratio"] in p["ratios"]
    assert p["floor_ci"][0] <= p["floor"] <= p["floor_ci"][1] and p["bootstrap"] == 1000
    assert (out / "pss.csv").read_text().splitlines()[0].startswith(
        "concept,category,tier,ratio,n_vectors,cs,g,pss,pss_delta,pss_delta_signed,pss_floor,random_cs")
    curve = (out / "pss_curve.csv").read_text().splitlines()
    assert curve[0] == "score,vectors,ratio,mean,ci_low,ci_high,headline" and len(curve) == 1 + 1 + 3 * 2 * 7  # header, floor; (paper, delta, delta_signed) x (top, random) x (6 ratios + peak)
    for k in ("gini_null", "excess_gini", "null_z", "above_null"):
        assert n[k].shape == (2, 48), k
    torch.testing.assert_close(n["excess_gini"], n["gini"] - n["gini_null"])
    assert {"mean_gini_null", "mean_excess_gini", "share_above_null"} <= set(s["neurons"])
    assert s["neurons"]["null_permutations"] == 8 and s["layers"][0]["categories_used"] == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["options"]["positions"] == "question" and cfg["fingerprint"]["probe_sha256"]
    assert cfg["versions"]["transformers"] and cfg["model"]["down_proj"][0] == "model.layers.0.mlp.down_proj"


def _hand_model(tmp_path):
    """A two-layer Llama whose attention and MLP outputs are zero, so every layer sees the
    token embedding: the coefficients are silu(G n(e)) * (U n(e)) with n = RMSNorm."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=4, intermediate_size=3, num_hidden_layers=2, num_attention_heads=1,
                         num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    G = [torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, -1.0], [0.5, 0.5, 0.5, 0.5]]),
         torch.tensor([[0, 0, 1.0, 0], [-1.0, 0, 0, 1.0], [0.3, -0.2, 0.1, 0.4]])]
    U = [torch.tensor([[0.5, 0, 0, 1.0], [1.0, 1.0, 0, 0], [0, 0, 0, 2.0]]),
         torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2]])]
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1)
        for l, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.mlp.gate_proj.weight.copy_(G[l])
            layer.mlp.up_proj.weight.copy_(U[l])
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    path = tmp_path / "hand"
    model.save_pretrained(path, safe_serialization=True)
    T.tokenizer().save_pretrained(path)
    return path, model.model.embed_tokens.weight.detach().double(), G, U


def test_hand_set_model_gives_hand_computed_entropy_and_gini(tmp_path, probe_file):
    path, E, G, U = _hand_model(tmp_path)
    out = tmp_path / "run"
    summary = run_analysis(AnalyzeConfig(model_dir=str(path), probe=str(probe_file), out=str(out), device="cpu",
                                         positions="all", batch_size=4, open_ended=False), progress=False)
    tok = T.tokenizer()
    qs = [json.loads(l) for l in (out / "questions.jsonl").read_text().splitlines()]
    cats = summary["probe"]["categories"]
    # Hand computation, float64: per prompt the mean |m| over its non-special tokens.
    mass = np.zeros((len(cats), 2, 3))
    n_prompts = np.zeros(len(cats))
    for q in qs:
        ids = tok(f"Question: {q['question']}\nAnswer:")["input_ids"][1:]  # drop BOS
        e = E[ids]
        x = e / torch.sqrt((e * e).mean(-1, keepdim=True) + 1e-6)
        k = cats.index(q["category"])
        for l in range(2):
            m = torch.nn.functional.silu(x @ G[l].double().T) * (x @ U[l].double().T)
            mass[k, l] += m.abs().mean(0).numpy()
        n_prompts[k] += 1
    mass /= n_prompts[:, None, None]
    got = load_file(str(out / "neurons.safetensors"))
    C = len(cats)
    for l in range(2):
        for n in range(3):
            x = mass[:, l, n]
            p = x / x.sum()
            H = -sum(pi * math.log(pi) for pi in p if pi > 0)
            xs = sorted(x)
            gini = sum((2 * (i + 1) - C - 1) * v for i, v in enumerate(xs)) / (C * sum(xs))
            assert got["entropy"][l, n].item() == pytest.approx(H, rel=2e-5, abs=1e-6)
            assert got["norm_entropy"][l, n].item() == pytest.approx(H / math.log(C), rel=2e-5, abs=1e-6)
            assert got["gini"][l, n].item() == pytest.approx(gini, rel=2e-4, abs=2e-6)
            assert got["top_category"][l, n].item() == int(np.argmax(x))


def test_resume_after_kill_equals_uninterrupted(tmp_path, llama_dir, probe_file):
    args = [llama_dir, "--probe", probe_file, "--device", "cpu", "--batch-size", "3", "--chunk-size", "5", "-q",
            "--no-report", "--checkpoint-every", "0"]
    full = tmp_path / "full"
    r = run_cli(args + ["--out", full])
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    r = run_cli(args + ["--out", killed], kill_at=("scoring", 2))
    assert r.returncode == -signal.SIGKILL
    prog = json.loads((killed / ".state" / "progress.json").read_text())
    assert prog["next_question"] == 15 and prog["rows"] == 15 and not (killed / "summary.json").exists()
    with open(killed / ".state" / "rows.jsonl", "a") as f:  # a row cut short by the kill
        f.write('{"concept": "country0", "categ')
    r = run_cli(args + ["--out", killed, "--resume"])
    assert r.returncode == 0, r.stderr
    s1, n1, q1 = read_run(full)
    s2, n2, q2 = read_run(killed)
    assert s1 == s2 and q1 == q2
    for k in n1:
        assert torch.equal(n1[k].nan_to_num(-7), n2[k].nan_to_num(-7)), k
    # --resume against changed options is refused: leave a checkpoint, then change --batch-size
    r = run_cli(args + ["--out", killed, "--overwrite"], kill_at=("scoring", 0))
    assert r.returncode == -signal.SIGKILL
    r = run_cli(args[:-6] + ["--batch-size", "2", "--chunk-size", "5", "-q", "--no-report", "--out", killed, "--resume"])
    assert r.returncode == 2 and "started with different inputs (options differ)" in r.stderr


def test_encoder_gets_specialization_only(tmp_path, probe_file):
    bert = T.save_tiny("bert", tmp_path / "bert")
    s = run_analysis(AnalyzeConfig(model_dir=str(bert), probe=str(probe_file), out=str(tmp_path / "r"), device="cpu"),
                     progress=False)
    assert s["accuracy"] == {"mcq": None, "mcq_norm": None, "open": None, "applicable": False}
    assert s["neurons"]["neurons"] == 96 and not (tmp_path / "r" / "accuracy.png").exists()


def test_nan_activations_are_counted_not_averaged(tmp_path, probe_file):
    import transformers as tf

    src = T.save_tiny("llama", tmp_path / "m", seed=2)
    model = tf.AutoModelForCausalLM.from_pretrained(src)
    tok = T.tokenizer()
    bad = tok("river", add_special_tokens=False)["input_ids"]  # every 'river' question contains it
    with torch.no_grad():
        model.model.embed_tokens.weight[bad] = float("nan")
    model.save_pretrained(src, safe_serialization=True)
    out = tmp_path / "r"
    s = run_analysis(AnalyzeConfig(model_dir=str(src), probe=str(probe_file), out=str(out), device="cpu",
                                   open_ended=False), progress=False)
    assert s["nonfinite_prompt_layers"] == [12, 12]  # the 12 'river' prompts, in both layers
    assert s["empty_categories"] == ["river"] and s["categories_used"] == ["country", "person"]
    n = load_file(str(out / "neurons.safetensors"))
    meta = load_file_meta(out / "neurons.safetensors")
    assert torch.isfinite(n["gini"]).all() and json.loads(meta["categories"]) == ["country", "river", "person"]
    assert json.loads(meta["categories_used_by_layer"]) == [[1, 0, 1], [1, 0, 1]]
    assert set(n["top_category"].unique().tolist()) <= {0, 2}  # indices into the full list, never 'river'


def test_category_missing_at_some_layers_is_dropped_there_only(caplog):
    """A category without a usable prompt at layer 1 only: layer 1's neurons use the other
    categories (not all dead), layer 0 keeps all three; counted and warned about."""
    from specext.analyze import specialisation
    from specext.probes import ProbeSet, Question
    from specext.metrics.specialization import ConceptMass

    qs = [Question(f"c{k}", cat, f"q{k}?", ("a", "b"), 0) for k, cat in enumerate(["x", "x", "y", "y", "z", "z"])]
    probe = ProbeSet("p", qs)
    g = torch.Generator().manual_seed(0)
    mass = ConceptMass(6, 2, 40)
    mass.counts.fill_(3.0)
    mass.counts[4:, 1] = 0  # category z: no usable prompt at layer 1
    mass.sums.copy_(torch.rand((6, 2, 40), generator=g) * mass.counts[..., None])
    with caplog.at_level("WARNING"):
        sp = specialisation(probe, mass, None, null_permutations=4, seed=0)
    assert "layer 1: z" in caplog.text
    assert sp.empty == [] and sp.dropped_by_layer == {1: ["z"]}
    assert torch.isfinite(sp.table.gini).all()
    assert [l["categories_used"] for l in sp.summary["layers"]] == [3, 2]
    assert set(sp.table.top_category[1].tolist()) <= {0, 1} and 2 in set(sp.table.top_category[0].tolist())
    assert torch.isfinite(sp.null.gini_null).all()


def load_file_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_out_of_memory_halves_the_batch(tmp_path, llama_dir, probe_file, monkeypatch, caplog):
    ref = run_analysis(AnalyzeConfig(model_dir=str(llama_dir), probe=str(probe_file), out=str(tmp_path / "a"),
                                     device="cpu", batch_size=2, open_ended=False, report=False), progress=False)
    from specext.probes.scoring import Scorer

    real = Scorer.score

    def flaky(self, questions, **kw):
        if len(questions) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, questions, **kw)

    monkeypatch.setattr(Scorer, "score", flaky)
    with caplog.at_level("WARNING"):
        got = run_analysis(AnalyzeConfig(model_dir=str(llama_dir), probe=str(probe_file), out=str(tmp_path / "b"),
                                         device="cpu", batch_size=8, open_ended=False, report=False), progress=False)
    assert "out of memory at batch size 8; retrying with 4" in caplog.text
    assert "retrying with 2" in caplog.text
    ref.pop("seconds"), got.pop("seconds")
    assert got == ref
    n1, n2 = load_file(str(tmp_path / "a" / "neurons.safetensors")), load_file(str(tmp_path / "b" / "neurons.safetensors"))
    assert all(torch.equal(n1[k], n2[k]) for k in n1)


@pytest.mark.parametrize("argv, msg", [
    (["--probe", "{probe_bad}"], "bad.jsonl:2: 'answer' must be an integer index"),
    (["--positions", "middle"], "invalid choice: 'middle'"),
    (["--stat", "mean"], "invalid choice: 'mean'"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-concepts", "0"], "--max-concepts must be >= 1"),
])
def test_bad_options(tmp_path, llama_dir, probe_file, argv, msg):
    bad = tmp_path / "bad.jsonl"
    good = probe_file.read_text().splitlines()[0]
    bad.write_text(good + "\n" + good.replace('"answer": 0', '"answer": 9') + "\n")
    argv = [a.format(probe_bad=bad) for a in argv]
    r = run_cli([llama_dir, "--out", tmp_path / "o", "--device", "cpu", "-q", *argv])
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_missing_model_dir(tmp_path):
    r = run_cli([tmp_path / "nope", "-q"])
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_resume_during_pss_equals_uninterrupted(tmp_path, llama_dir, probe_file):
    args = [llama_dir, "--probe", probe_file, "--device", "cpu", "--batch-size", "4", "-q", "--no-report", "--no-open",
            "--ratios", "1,10", "--pss-concepts", "4", "--pss-control", "10", "--pss-batch-rows", "16"]
    full = tmp_path / "full"
    r = run_cli(args + ["--out", full])
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    r = run_cli(args + ["--out", killed], kill_at=("pss", 1))
    assert r.returncode == -signal.SIGKILL
    done = json.loads((killed / ".state" / "pss.json").read_text())
    assert len(done) == 2 and not (killed / "pss.csv").exists()
    r = run_cli(args + ["--out", killed, "--resume"])
    assert r.returncode == 0, r.stderr
    assert (full / "pss.csv").read_text() == (killed / "pss.csv").read_text()
    s1, _, _ = read_run(full)
    s2, _, _ = read_run(killed)
    assert s1 == s2 and s1["pss"]["concepts"] == 4


def test_random_twin_and_subject_positions(tmp_path, llama_dir, caplog):
    """--random-twin runs the architecture with seeded random weights on the same probe and
    positions; --positions subject-last reads the concept name's last token, and prompts
    without the name are left out of the mass, counted and warned about."""
    qs = []
    for k, cat in enumerate(["country", "river", "person"]):
        for c in range(3):
            name = f"{cat}{c}"
            for j in range(4):
                text = f"What is fact {j} of {name}?" if not (k == 2 and c == 2) else f"What is fact {j} of it?"
                qs.append(Question(name, cat, text, ("Paris", "Gold", "Tallinn", "Physics"), j % 4))
    probe = write_probe(tmp_path / "p.jsonl", qs)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        rc = main([str(llama_dir), "--probe", str(probe), "--out", str(out), "--device", "cpu", "--no-pss", "--no-open",
                   "--random-twin", "--positions", "subject-last", "--null-permutations", "4", "-q"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["positions"] == "subject-last" and s["prompts_without_positions"] == 4
    assert "4 of 36 prompts have no token at --positions subject-last" in caplog.text
    m = load_file(str(out / "mass.safetensors"))
    assert m["concept_counts"][8].tolist() == [0.0, 0.0] and (m["concept_counts"][:8] == 4).all()
    tw = s["random_twin"]
    assert tw["seed"] == 1 and 0 <= tw["accuracy"]["mcq"] <= 1
    assert tw["model_over_twin"]["mean_gini"] == pytest.approx(s["neurons"]["mean_gini"] / tw["mean_gini"])
    n = load_file(str(out / "neurons.safetensors"))
    assert n["twin_gini"].shape == (2, 48) and not torch.equal(n["twin_gini"], n["gini"])
    html = (out / "report.html").read_text()
    assert "random-init twin" in html
    # the twin is seeded: a second run gives the same twin numbers
    out2 = tmp_path / "run2"
    assert main([str(llama_dir), "--probe", str(probe), "--out", str(out2), "--device", "cpu", "--no-pss", "--no-open",
                 "--random-twin", "--positions", "subject-last", "--null-permutations", "4", "-q"]) == 0
    assert json.loads((out2 / "summary.json").read_text())["random_twin"] == tw


def write_probe(path, qs):
    write_jsonl(qs, path)
    return path


@pytest.mark.parametrize("argv, msg", [
    (["--null-permutations", "1"], "--null-permutations must be 0 (off) or >= 2"),
    (["--bootstrap", "3"], "--bootstrap must be 0 (off) or >= 10"),
])
def test_bad_control_options(tmp_path, llama_dir, probe_file, capsys, argv, msg):
    assert main([str(llama_dir), "--probe", str(probe_file), "--out", str(tmp_path / "o"), "-q", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_memory_plan_is_logged_and_warns_when_it_does_not_fit(tmp_path, llama_dir, probe_file, monkeypatch, caplog):
    from specext.pipelines import run

    monkeypatch.setattr(run, "_free_bytes", lambda device: 1000)  # almost nothing free
    with caplog.at_level("INFO"):
        s = run_analysis(AnalyzeConfig(model_dir=str(llama_dir), probe=str(probe_file), out=str(tmp_path / "r"),
                                       device="cpu", open_ended=False, pss=False, report=False,
                                       accumulate_device="cpu"), progress=False)
    assert "memory plan: accumulators" in caplog.text
    assert "memory: the run needs" in caplog.text and "(sample concepts with --max-concepts)" in caplog.text
    plan = json.loads((tmp_path / "r" / "config.json").read_text())["memory_plan"]
    assert plan["accumulators_bytes"] == 9 * 2 * 48 * 4 + 9 * 2 * 4 and plan["accumulate_device"] == "cpu"
    assert s["neurons"]["neurons"] == 96
