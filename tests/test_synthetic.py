"""Tests for specext.probes.synthetic (the fictional world, its probe, the word-level tokenizer),
the demo-model builder (scripts/build_demo_model.py) and the shipped demo model."""

import collections
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from specext import probes
from specext.probes import synthetic
from specext.models import load_model
from specext.probes import MCQ_TEMPLATE, ProbeSet, check_probe, normalize_answer, read_jsonl, write_jsonl
from script_module import load_script

DEMO_DIR = probes.DATA_DIR / "demo_model"
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_demo_model.py"


def _fields(q):
    return (q.concept, q.category, q.question, q.choices, q.answer, q.tier, q.aliases, q.facts)


@pytest.fixture(scope="module")
def build():
    """scripts/build_demo_model.py as a module (its train_demo_model and mcq_report)."""
    return load_script(BUILD_SCRIPT, "build_demo_model")


@pytest.fixture(scope="module")
def world():
    return synthetic.generate_world(0)


@pytest.fixture(scope="module")
def questions(world):
    return synthetic.world_questions(world)


@pytest.fixture(scope="module")
def tokenizer(world, questions):
    lines = synthetic.training_text(world, questions)
    return synthetic.build_tokenizer(lines, extra_words=[c for q in questions for c in q.choices])


# --------------------------------------------------------------------------- world and probe


def test_generation_is_deterministic(questions):
    again = synthetic.world_questions(synthetic.generate_world(0))
    assert [_fields(q) for q in again] == [_fields(q) for q in questions]
    other = synthetic.world_questions(synthetic.generate_world(1))
    assert [_fields(q) for q in other] != [_fields(q) for q in questions]
    assert {q.concept for q in other} != {q.concept for q in questions}
    w = synthetic.generate_world(0)
    assert synthetic.training_text(w, questions) == synthetic.training_text(w, again)


def test_probe_schema(tmp_path, world, questions):
    path = tmp_path / "synthetic.jsonl"
    write_jsonl(questions, path)
    back = read_jsonl(path)
    assert [_fields(q) for q in back] == [_fields(q) for q in questions]
    probe = ProbeSet("synthetic", back)
    check_probe(probe, min_concepts=60)
    assert len(probe.categories) >= 6
    assert 60 <= len(probe.concepts) <= 120
    assert set(probe.tiers) == {"high", "medium", "low"}

    per_concept = collections.Counter(q.concept for q in questions)
    assert min(per_concept.values()) >= 10
    entities = {e.name: e for e in world.all_entities()}
    for q in questions:
        assert len(q.choices) == 4
        assert len({normalize_answer(c) for c in q.choices}) == 4, q
        distractors = [c for i, c in enumerate(q.choices) if i != q.answer]
        assert normalize_answer(q.correct) not in {normalize_answer(d) for d in distractors}
        e = entities[q.concept]
        assert q.category == e.category and q.tier == e.tier
        assert q.correct in e.attrs.values()
        assert 1 <= len(q.facts) <= 2 and q.correct in " ".join(q.facts)
        # distractors are the same attribute's values of other entities of the category
        key = next(k for k, v in e.attrs.items() if v == q.correct)
        pool = {o.attrs[key] for o in world.entities[q.category] if o is not e}
        assert set(distractors) <= pool
        assert q.concept in q.question
        assert q.accepted_answers()[0] == q.correct

    # correct option positions balanced; tiers about a third each per category
    pos = collections.Counter(q.answer for q in questions)
    assert max(pos.values()) - min(pos.values()) <= 1
    for cat in world.categories:
        tiers = collections.Counter(e.tier for e in world.entities[cat])
        assert max(tiers.values()) - min(tiers.values()) <= 1


def test_names_are_unique_ascii_syllable_words(world):
    names = [e.name for e in world.all_entities()]
    assert len(set(names)) == len(names)
    # the distinctive first word of every entity name is unique across the world
    heads = [n.split()[0].lower() for n in names]
    assert len(set(heads)) == len(heads)
    for n in names:
        assert n.isascii() and re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)?", n), n
        assert n.split()[0].lower() not in synthetic._REAL_WORDS


def test_training_text_repeats_facts_by_tier(world, questions):
    lines = synthetic.training_text(world, questions)
    counts = collections.Counter(lines)
    for e in world.all_entities():
        for f in world.facts(e):
            assert counts[f] == synthetic.TIER_REPEATS[e.tier], (e.tier, f)
    for q in questions:
        assert counts[MCQ_TEMPLATE.format(question=q.question) + " " + q.correct] == 1
    assert len(lines) == sum(counts.values())
    assert lines != sorted(lines)  # shuffled


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_continuation_split(tokenizer, questions):
    bos, unk = tokenizer.bos_token_id, tokenizer.unk_token_id
    for q in questions:
        prompt = q.mcq_prompt()
        ctx = tokenizer(prompt)["input_ids"]
        assert ctx[0] == bos and unk not in ctx
        assert "\n" in tokenizer.convert_ids_to_tokens(ctx)
        for c in q.choices:
            whole = tokenizer(prompt + " " + c)["input_ids"]
            cont = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            assert whole == ctx + cont, (prompt, c)
            assert cont and unk not in cont


def test_tokenizer_round_trip_and_padding(tokenizer, world, tmp_path):
    for e in world.all_entities()[::7]:
        for f in world.facts(e):
            ids = tokenizer(f)["input_ids"]
            assert tokenizer.decode(ids, skip_special_tokens=True) == f
    text = "Question: What is the capital of Nowhere?\nAnswer: Zzz"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id in ids  # unknown words map to [UNK]
    assert " ".join(tokenizer.decode(ids, skip_special_tokens=True).split()) != ""
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"

    batch = tokenizer(["In which city", "In"], padding=True)
    assert batch["input_ids"][1][-1] == tokenizer.pad_token_id and batch["attention_mask"][1][-1] == 0
    left = synthetic.build_tokenizer(["In which city"], padding_side="left")
    batch = left(["In which city", "In"], padding=True)
    assert batch["input_ids"][1][0] == left.pad_token_id and batch["attention_mask"][1][0] == 0

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    back = AutoTokenizer.from_pretrained(tmp_path)
    for s in (text, world.facts(world.all_entities()[0])[0]):
        assert back(s)["input_ids"] == tokenizer(s)["input_ids"]


# --------------------------------------------------------------------------- training


TINY = dict(steps=40, d_model=32, n_layers=2, d_ff=64, n_heads=2, batch_size=16, lr=1e-2, warmup=5)


def test_tiny_training_run(tmp_path, build):
    w = synthetic.generate_world(3, concepts_per_category=4)
    qs = synthetic.world_questions(w)
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    res = build.train_demo_model(w, tmp_path / "a", seed=1, questions=qs, progress=False, **TINY)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == prev
    assert res["final_loss"] < res["initial_loss"] - 1.0
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0 and 0.0 < res["p_correct"] < 1.0
    assert list(res["acc_by_tier"]) == ["high", "medium", "low"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "specext_demo.json"):
        assert (tmp_path / "a" / f).is_file(), f
    assert not list((tmp_path / "a").glob("*.bin"))
    meta = json.loads((tmp_path / "a" / "specext_demo.json").read_text())
    assert meta["seed"] == 1 and meta["steps"] == TINY["steps"] and meta["final_loss"] == res["final_loss"]
    assert meta["acc"] == res["acc"] and meta["hyperparameters"]["lr"] == TINY["lr"]

    lm = load_model(tmp_path / "a", device="cpu")
    assert lm.model.config.tie_word_embeddings and lm.model.config.vocab_size == len(lm.tokenizer)
    report = build.mcq_report(lm, qs)
    assert report["acc"] == pytest.approx(res["acc"])
    assert report["p_correct"] == pytest.approx(res["p_correct"], rel=1e-5)

    # same seed, same bytes
    build.train_demo_model(w, tmp_path / "b", seed=1, questions=qs, evaluate=False, progress=False, **TINY)
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in "ab"]
    assert digest[0] == digest[1]


# --------------------------------------------------------------------------- shipped artefacts


def test_shipped_probe_matches_generator():
    shipped = read_jsonl(probes.BUILTIN["synthetic"])
    regenerated = synthetic.world_questions(synthetic.generate_world(0))
    assert [_fields(q) for q in shipped] == [_fields(q) for q in regenerated], \
        "python/specext/data/synthetic.jsonl is stale: rerun scripts/build_demo_model.py"
    check_probe(probes.load_probe("synthetic"), min_concepts=60)


def test_shipped_demo_model_scores(build):
    assert DEMO_DIR.is_dir(), "missing demo model: run scripts/build_demo_model.py"
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size <= 10e6
    assert not list(DEMO_DIR.glob("*.bin"))
    lm = load_model(DEMO_DIR, device="cpu")
    qs = read_jsonl(probes.BUILTIN["synthetic"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest (and least disturbed) on one thread
    try:
        report = build.mcq_report(lm, qs)
    finally:
        torch.set_num_threads(threads)
    assert report["acc"] >= 0.8
    meta = json.loads((DEMO_DIR / "specext_demo.json").read_text())
    assert meta["acc"] == pytest.approx(report["acc"], abs=0.02)
    assert meta["acc_norm"] == pytest.approx(report["acc_norm"], abs=0.02)
