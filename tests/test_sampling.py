"""Sampled answers and answer-position hidden states (specext.probes.sampling), and the
held-out model of the synthetic world (specext.pipelines.demo_models)."""

import functools
import json
import re

import pytest
import torch

import tiny_models
from specext.metrics.hallucination import semantic_entropy
from specext.models import load_model
from specext.pipelines import demo_models
from specext.probes import read_jsonl, synthetic
from specext.probes.probeset import BUILTIN, MCQ_TEMPLATE, Question
from specext.probes.sampling import answer_hidden_states, answer_seed, sample_answers
from specext.probes.scoring import Scorer


@pytest.fixture(scope="module")
def probe():
    return read_jsonl(BUILTIN["synthetic"])


@pytest.fixture(scope="module")
def holdout():
    return load_model(demo_models.holdout_model_dir(), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def held(probe):
    names = set(demo_models.held_out_concepts(demo_models.holdout_model_dir()))
    return [q for q in probe if q.concept in names]


# ------------------------------------------------------------------ sampling

def test_same_seed_same_answers_whatever_the_batch(holdout, held):
    qs = held[:5]
    a = sample_answers(holdout, qs, n=6, temperature=1.5, seed=3, batch_size=8)
    assert len(a) == 5 and all(len(x) == 6 and all(isinstance(s, str) for s in x) for x in a)
    assert sample_answers(holdout, qs, n=6, temperature=1.5, seed=3, batch_size=8) == a
    assert sample_answers(holdout, qs, n=6, temperature=1.5, seed=3, batch_size=2) == a
    assert sample_answers(holdout, qs[::-1], n=6, temperature=1.5, seed=3)[::-1] == a  # keyed by question
    other = sample_answers(holdout, qs, n=6, temperature=1.5, seed=4)
    assert other != a
    assert answer_seed(3, qs[0], 0) != answer_seed(3, qs[0], 1) != answer_seed(4, qs[0], 1)


def test_temperature_behaviour(holdout, held, probe):
    qs = held[:6]
    greedy = [r.open_text for r in Scorer(holdout, open_ended=True).score(qs)]
    cold = sample_answers(holdout, qs, n=5, temperature=1e-4, seed=0)
    assert cold == [[g] * 5 for g in greedy]  # T -> 0 is the scorer's greedy answer, same stopping
    hot = sample_answers(holdout, qs, n=8, temperature=3.0, seed=0)
    se_cold = sum(semantic_entropy(a, q) for a, q in zip(cold, qs))
    se_hot = sum(semantic_entropy(a, q) for a, q in zip(hot, qs))
    assert se_cold == 0.0 and se_hot > 1.0
    # answers are single lines, as the scorer's
    assert all("\n" not in s for x in hot for s in x)


def test_seen_facts_are_sampled_more_consistently_than_held_out_ones(holdout, held, probe):
    names = {q.concept for q in held}
    seen = [q for q in probe if q.concept not in names][:12]
    se = lambda qs: sum(semantic_entropy(a, q) for a, q in zip(sample_answers(holdout, qs, 8, 1.0, 0), qs)) / len(qs)
    assert se(seen) < se(held[:12])


def test_sampling_errors(holdout, held, tmp_path):
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="n "):
            sample_answers(holdout, held[:1], n=bad, temperature=1.0, seed=0)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample_answers(holdout, held[:1], n=2, temperature=bad, seed=0)
    with pytest.raises(TypeError, match="LoadedModel"):
        sample_answers(holdout.model, held[:1], n=2, temperature=1.0, seed=0)
    bert = load_model(tiny_models.save_tiny("bert", tmp_path / "bert"), device="cpu")
    with pytest.raises(ValueError, match="LM head"):
        sample_answers(bert, held[:1], n=2, temperature=1.0, seed=0)


# ------------------------------------------------------------------ hidden states

QS = [Question("A", "x", q, ("a", "b"), 0) for q in
      ("What is the capital of Aldoria?", "Which river?", "Paris is the capital of which country, and since when?")]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_hidden_state_at_the_last_prompt_token_under_padding(tmp_path, arch, side):
    lm = load_model(tiny_models.save_tiny(arch, tmp_path / arch), dtype="float32", device="cpu")
    lm.tokenizer.padding_side = side
    got = answer_hidden_states(lm, QS, batch_size=3)
    assert got.shape == (3, lm.model.config.hidden_size) and got.dtype == torch.float32 and got.device.type == "cpu"
    for i, q in enumerate(QS):
        ids = lm.tokenizer(MCQ_TEMPLATE.format(question=q.question), return_tensors="pt")
        with torch.no_grad():
            out = lm.model(**ids, output_hidden_states=True)
        last = out.hidden_states[-1][0]
        want = last[-1]  # the tiny tokenizer adds no trailing special token (not even for bert)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)
        # transformers' last hidden state is after the final norm
        base = getattr(lm.model, "model", None) or getattr(lm.model, "transformer", None) or lm.model
        torch.testing.assert_close(out.hidden_states[-1], base(**ids).last_hidden_state)
    # one at a time equals the batch
    torch.testing.assert_close(answer_hidden_states(lm, QS, batch_size=1), got, rtol=1e-4, atol=1e-5)


def test_hidden_states_of_no_questions(holdout):
    assert answer_hidden_states(holdout, []).shape == (0, 128)


# ------------------------------------------------------------------ the held-out model

def test_holdout_model_is_shipped_and_lists_its_concepts(probe):
    d = demo_models.holdout_model_dir()
    assert d == demo_models.HOLDOUT_MODEL and (d / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in d.iterdir()) <= 5e6
    names = demo_models.held_out_concepts(d)
    meta = json.loads((d / "specext_demo.json").read_text())
    world = synthetic.generate_world(meta["world_seed"])
    assert names == synthetic.holdout_concepts(world, 2, meta["seed"])
    cats = {q.concept: q.category for q in probe}
    assert all(sum(cats[c] == k for c in names) == 2 for k in synthetic.CATEGORIES)
    with pytest.raises(ValueError, match="held_out_concepts"):
        demo_models.held_out_concepts(demo_models.DEMO_MODEL)


def test_held_out_concepts_are_absent_from_the_training_text(probe):
    d = demo_models.HOLDOUT_MODEL
    meta = json.loads((d / "specext_demo.json").read_text())
    names = set(meta["held_out_concepts"])
    world = synthetic.generate_world(meta["world_seed"])
    qs = synthetic.world_questions(world)
    lines = synthetic.training_text(world, qs, seed=meta["seed"], held_out=sorted(names))
    assert len(lines) == meta["n_train_lines"]  # the text the shipped model was trained on
    held_facts = {f for e in world.all_entities() if e.name in names for f in world.facts(e)}
    held_questions = {q.question for q in qs if q.concept in names}
    assert held_facts and held_questions
    for line in lines:
        assert line not in held_facts
        assert not any(q in line for q in held_questions)
    # every other entity's facts and questions are there
    seen_facts = {f for e in world.all_entities() if e.name not in names for f in world.facts(e)}
    assert seen_facts <= set(lines)
    # the demo model's corpus is unchanged by the option
    assert synthetic.training_text(world, qs, seed=0) == synthetic.training_text(world, qs, seed=0, held_out=())
    # the tokenizer covers the held-out concepts' words (fine-tuning can teach them)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    unk = tok.unk_token_id
    for f in sorted(held_facts):
        assert unk not in tok(f)["input_ids"], f


def test_holdout_model_knows_seen_concepts_only(holdout, probe, held):
    names = {q.concept for q in held}
    seen = [q for q in probe if q.concept not in names][::10]
    assert demo_models.mcq_report(holdout, seen)["acc"] >= 0.9
    assert demo_models.mcq_report(holdout, held)["acc"] <= 0.35  # chance is 0.25


def test_holdout_model_is_built_into_the_cache_when_not_shipped(tmp_path, monkeypatch):
    calls = []
    real = demo_models.build_holdout_model

    def tiny_build(out_dir, **kw):
        calls.append(out_dir)
        return real(out_dir, steps=3, d_model=16, d_ff=32, n_layers=1, n_heads=2, min_seen_acc=0.0, **kw)

    monkeypatch.setattr(demo_models, "HOLDOUT_MODEL", tmp_path / "not-shipped")
    monkeypatch.setattr(demo_models, "build_holdout_model", tiny_build)
    monkeypatch.setenv("SPECEXT_CACHE", str(tmp_path / "cache"))
    d = demo_models.holdout_model_dir()
    assert d == tmp_path / "cache" / "holdout_model" and len(calls) == 1
    assert len(demo_models.held_out_concepts(d)) == 12
    assert demo_models.holdout_model_dir() == d and len(calls) == 1  # reused
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "holdout_model"]  # no temporary left
