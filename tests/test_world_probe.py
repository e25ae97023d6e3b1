"""The built-in ``world`` probe set (real-world knowledge for real LLMs): size, balance,
well-formed questions, and that ``scripts/build_world_probe.py`` reproduces the shipped
file from the tables in ``scripts/world_data/``."""

import importlib.util
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from specext import probes
from specext.probes import normalize_answer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_world_probe.py"
TABLES = ROOT / "scripts" / "world_data"
CATEGORIES = {"person", "city", "country", "element", "company", "work"}
TIERS = {"high", "medium", "low"}


@pytest.fixture(scope="module")
def world():
    return probes.load_probe("world")


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_world_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _by_concept(world):
    out = defaultdict(list)
    for q in world.questions:
        out[q.concept].append(q)
    return out


def test_size_and_categories(world):
    assert len(world.concepts) >= 150
    assert len(world.categories) >= 6
    assert CATEGORIES <= set(world.categories)
    per_cat = Counter(world.categories[k] for k in world.concept_category)
    small = {c: n for c, n in per_cat.items() if n < 25}
    assert not small, f"categories with fewer than 25 concepts: {small}"


def test_questions_per_concept_and_choices(world):
    for concept, qs in _by_concept(world).items():
        assert len(qs) >= 10, f"{concept}: {len(qs)} questions"
        for q in qs:
            assert len(q.choices) == 4, q
            assert len({normalize_answer(c) for c in q.choices}) == 4, q
            assert 0 <= q.answer < 4


def test_answer_positions_balanced(world):
    hist = Counter(q.answer for q in world.questions)
    n = len(world.questions)
    for pos in range(4):
        share = hist[pos] / n
        assert 0.15 <= share <= 0.35, f"answer position {pos}: {share:.1%} of {n} ({dict(hist)})"


def test_no_answer_leaks_into_question(world):
    for q in world.questions:
        text = f" {normalize_answer(q.question)} "
        for a in q.accepted_answers():
            assert f" {normalize_answer(a)} " not in text, f"{q.source}: {a!r} appears in {q.question!r}"


def test_distractors_are_not_accepted_answers(world):
    for q in world.questions:
        accepted = {normalize_answer(a) for a in q.accepted_answers()}
        for i, c in enumerate(q.choices):
            if i != q.answer:
                assert normalize_answer(c) not in accepted, f"{q.source}: distractor {c!r} is an accepted answer"


def test_facts_and_tiers(world):
    for concept, qs in _by_concept(world).items():
        assert all(q.facts for q in qs), f"{concept}: a question without facts"
        assert len({q.facts for q in qs}) == 1, f"{concept}: facts differ between its questions"
        assert {q.tier for q in qs} <= TIERS and len({q.tier for q in qs}) == 1, f"{concept}: tiers {[q.tier for q in qs]}"
    tiers_per_cat = defaultdict(set)
    for k, tier in zip(world.concept_category, world.concept_tier):
        tiers_per_cat[world.categories[k]].add(tier)
    for cat, tiers in tiers_per_cat.items():
        assert tiers == TIERS, f"category {cat}: tiers {sorted(tiers)}"


def test_rebuild_reproduces_shipped_file(builder, tmp_path):
    out = tmp_path / "world.jsonl"
    assert builder.main(["--output", str(out), "--quiet"]) == 0
    assert out.read_bytes() == probes.BUILTIN["world"].read_bytes(), (
        "scripts/build_world_probe.py output differs from python/specext/data/world.jsonl: "
        "rerun the script after editing scripts/world_data/")


def _edit(name, old, new):
    def f(d):
        p = d / name
        s = p.read_text(encoding="utf-8")
        assert old in s, old
        p.write_text(s.replace(old, new, 1), encoding="utf-8")
    return f


@pytest.mark.parametrize("mutate, message", [
    (_edit("city.csv", "\nTurin,", "\nParis,"), "city.csv:29 (Paris): duplicate concept"),
    (_edit("country.csv", "\nPeru,,low,Lima,", "\nPeru,,low,,"), "country.csv:27 (Peru): missing value for attribute 'capital'"),
    (_edit("city.csv", "Big Ben,Elizabeth Tower", "Big Ben,London"), "city.csv:3 (London): answer 'London' of 'landmark' appears"),
    (_edit("element.csv", "\nCobalt,cobalt,", "\nCobalt,gold,"), "element.csv:29 (Cobalt): duplicate question"),
], ids=["duplicate-concept", "missing-value", "leak", "duplicate-question"])
def test_build_rejects_bad_tables(builder, tmp_path, capsys, mutate, message):
    data = tmp_path / "world_data"
    shutil.copytree(TABLES, data)
    mutate(data)
    assert builder.main(["--data-dir", str(data), "--output", str(tmp_path / "w.jsonl"), "--quiet"]) == 1
    assert message in capsys.readouterr().err
