"""Prompts past the model's positions (issue 13 item 5): an error naming the question's
file:line and the limit before any forward pass, or --truncate left with a warning and a
count in summary.json."""

import json

import pytest

import tiny_models as T
from specext.analyze import AnalyzeConfig, main
from specext.models.loading import load_model
from specext.probes import Question, load_probe, write_jsonl
from specext.probes.scoring import Scorer, position_limit

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40) + " What is Paris?"


def make_probe(path, long_at=(5,)):
    qs = []
    words = ["Velmora", "Paris", "Tallinn", "Gold"]
    for k, cat in enumerate(["country", "river"]):
        for c in range(2):
            for j in range(3):
                qs.append(Question(f"{cat}{c}", cat, f"What is fact {j} of the {cat} number {c}?", tuple(words),
                                   j % 4, aliases=(words[j % 4].lower(),)))
    for i in long_at:
        q = qs[i]
        qs[i] = Question(q.concept, q.category, LONG, q.choices, q.answer, aliases=q.aliases)
    write_jsonl(qs, path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    return T.save_tiny(request.param, tmp_path_factory.mktemp("m") / request.param, seed=1)


def test_position_limit_from_config(model_dir):
    assert position_limit(load_model(str(model_dir), device="cpu").model) == 128


def test_long_prompt_errors_naming_file_line_and_limit(model_dir, tmp_path, capsys):
    probe = make_probe(tmp_path / "probe.jsonl")
    rc = main([str(model_dir), "--probe", str(probe), "--out", str(tmp_path / "run"), "--device", "cpu",
               "--no-pss", "--no-report", "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{probe}:6" in err and "128" in err and "--truncate left" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_scorer_checks_before_the_forward_pass(model_dir, tmp_path):
    lm = load_model(str(model_dir), device="cpu")
    qs = load_probe(str(make_probe(tmp_path / "probe.jsonl"))).questions
    with pytest.raises(ValueError, match=r"probe\.jsonl:6.*128"):
        Scorer(lm).score(qs[4:7])  # no IndexError from GPT-2's position table
    s = Scorer(lm, truncate="left")
    res = s.score(qs[4:7])
    assert len(res) == 3 and all(len(r.option_logprobs) == 4 for r in res)
    assert len(s.truncated) == 1 and next(iter(s.truncated)).endswith("probe.jsonl:6")


def test_truncate_left_runs_and_counts(model_dir, tmp_path, caplog):
    probe = make_probe(tmp_path / "probe.jsonl", long_at=(2, 7))
    out = tmp_path / "run"
    args = [str(model_dir), "--probe", str(probe), "--out", str(out), "--device", "cpu", "--truncate", "left",
            "--no-report", "-q", "--pss-concepts", "2", "--bootstrap", "0"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["truncated_prompts"] == 2
    assert json.loads((out / "config.json").read_text())["options"]["truncate"] == "left"


def test_truncate_option_is_checked():
    with pytest.raises(ValueError, match="--truncate"):
        AnalyzeConfig(model_dir="x", truncate="right")
