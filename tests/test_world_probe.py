"""The built-in ``world`` probe set (real-world knowledge for real LLMs): size, balance,
well-formed questions, accepted answers that are names of the answer, distractors without a
cheap signal (measured here, from the shipped file, independently of the builder), and that
``scripts/build_world_probe.py`` reproduces the shipped file from the tables in
``scripts/world_data/``. See docs/world-probe.md."""

import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from specext import probes
from specext.probes import normalize_answer
from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_world_probe.py"
TABLES = ROOT / "scripts" / "world_data"
DOC = ROOT / "docs" / "world-probe.md"
CATEGORIES = {"person", "city", "country", "element", "company", "work"}
TIERS = {"high", "medium", "low"}


@pytest.fixture(scope="module")
def world():
    return probes.load_probe("world")


@pytest.fixture(scope="module")
def builder():
    mod = load_script(SCRIPT, "build_world_probe")
    try:
        yield mod
    finally:
        sys.modules.pop("build_world_probe", None)


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


@pytest.fixture(scope="module")
def templates(world, builder):
    """The template of each question of the shipped file, found by matching its text against
    the builder's templates (``category.attribute/1`` or ``/2``)."""
    patterns = []
    for cat, attrs in builder.SCHEMA.items():
        for a in attrs:
            for i, t in enumerate(a.templates):
                rx = re.sub(r"\\\{\w+\\\}", "(.+)", re.escape(t))
                patterns.append((cat, f"{cat}.{a.name}/{i + 1}", re.compile(rx, re.IGNORECASE)))
    out = []
    for q in world.questions:
        hits = [t for cat, t, rx in patterns if cat == q.category and rx.fullmatch(q.question)]
        assert len(hits) == 1, f"{q.source}: {q.question!r} matches templates {hits}"
        out.append(hits[0])
    return out


def test_questions_per_concept_and_choices(world, templates):
    attrs = defaultdict(Counter)
    for q, t in zip(world.questions, templates):
        attrs[q.concept][t.split("/")[0]] += 1
    for concept, qs in _by_concept(world).items():
        # at least 3 attributes, each asked in both of its phrasings (docs/world-probe.md)
        assert len(qs) >= 6, f"{concept}: {len(qs)} questions"
        assert len(attrs[concept]) >= 3 and set(attrs[concept].values()) == {2}, f"{concept}: {dict(attrs[concept])}"
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
    (_edit("country.csv", "\nPeru,,low,Lima,", "\nPeru,,low,,"), "country.csv:25 (Peru): missing value for attribute 'capital'"),
    (_edit("city.csv", "Big Ben,Elizabeth Tower", "Big Ben,London"), "city.csv:3 (London): answer 'London' of 'landmark' appears"),
    (_edit("element.csv", "\nCobalt,cobalt,", "\nCobalt,gold,"), "element.csv:29 (Cobalt): duplicate question"),
    # an accepted answer that is another concept's answer of the same attribute
    (_edit("city.csv", "Great Britain,England,", "Great Britain,England|France,"),
     "city.csv:3 (London): 'country_also' accepts 'France', which is the answer of 'country' for city.csv:2 (Paris)"),
    (_edit("person.csv", "physicist,,inventor|mathematician|astronomer,", "physicist,mathematician,inventor|astronomer,"),
     "person.csv:3 (Isaac Newton): 'occupation_aliases' accepts 'mathematician', which is the answer of "
     "'occupation' for person.csv:25 (Srinivasa Ramanujan)"),
], ids=["duplicate-concept", "missing-value", "leak", "duplicate-question", "alias-is-other-answer",
        "alias-is-other-answer-2"])
def test_build_rejects_bad_tables(builder, tmp_path, capsys, mutate, message):
    data = tmp_path / "world_data"
    shutil.copytree(TABLES, data)
    mutate(data)
    assert builder.main(["--data-dir", str(data), "--output", str(tmp_path / "w.jsonl"), "--quiet"]) == 1
    assert message in capsys.readouterr().err


def test_build_rejects_an_alias_offered_as_distractor(builder):
    """check_question (run on every generated question) rejects a distractor that is one of the
    question's accepted answers; the generator cannot produce one, so forge the question."""
    concepts = {c.name: c for c in builder.read_tables(TABLES)}
    london = concepts["London"]
    river = next(a for a in builder.SCHEMA["city"] if a.name == "river")
    q = probes.Question(concept="London", category="city", question="On which river does London lie?",
                        choices=("Seine", "Thames", "River Thames", "Tiber"), answer=1,
                        aliases=("River Thames",), tier="high", facts=london.facts)
    with pytest.raises(builder.BuildError, match=r"^city\.csv:3 \(London\): distractor 'River Thames' is an "
                                                 r"accepted answer \(alias\)"):
        builder.check_question(london, river, q)


def test_accepted_answers_are_not_other_answers(world, templates):
    """An accepted open-ended answer is another name of the question's answer: never the
    answer of another question of the same template (a second official language is not the
    main language), never one of the question's distractors."""
    answers = defaultdict(set)
    for q, t in zip(world.questions, templates):
        answers[t].add(normalize_answer(q.correct))
    for q, t in zip(world.questions, templates):
        own = normalize_answer(q.correct)
        for a in q.aliases:
            k = normalize_answer(a)
            assert k == own or k not in answers[t], f"{q.source}: alias {a!r} of {q.correct!r} answers another {t}"
            assert k not in {normalize_answer(c) for c in q.choices}, f"{q.source}: alias {a!r} is a choice"


@pytest.mark.parametrize("concept, wrong", [
    ("Canada", "French"), ("Switzerland", "French"), ("Switzerland", "Italian"), ("Switzerland", "Romansh"),
    ("Peru", "Quechua"), ("New Zealand", "Maori"), ("India", "English"), ("Kenya", "English"), ("Dublin", "Irish"),
])
def test_second_official_languages_are_neither_accepted_nor_offered(world, concept, wrong):
    qs = [q for q in world.questions if q.concept == concept and "language" in q.question]
    for q in qs:
        assert normalize_answer(wrong) not in {normalize_answer(a) for a in q.accepted_answers()}, q.source
        assert normalize_answer(wrong) not in {normalize_answer(c) for c in q.choices}, q.source


# --------------------------------------------------------------------------- cheap guessers
# Independent of the builder's own measurement: recomputed here from the shipped file.

CHANCE = 0.25
MARGIN = 0.10


def _stems(text, n):
    return {w[:n] for w in normalize_answer(text).split() if len(w) >= n and not w.isdigit()}


def _argmax_credit(scores, answer):
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return (answer in winners) / len(winners)


def measure_guessers(world, templates, stem_len=4):
    """Per template: number of questions and the expected accuracy (fractional credit for
    ties) of
    - prior-only, three variants: pick the choice most often correct in the other questions of
      the template (``count``), with the highest rate correct / offered there (``rate``; a choice
      never offered elsewhere rates 1/4), or most often correct over all of the template's
      questions, this one included (``all``);
    - stem-overlap (``stem``): the choices sharing a ``stem_len``-letter word prefix with the
      concept's name; one: pick it; several: 1/k if the answer is among them; none: chance."""
    by_t = defaultdict(list)
    for q, t in zip(world.questions, templates):
        by_t[t].append(q)
    out = {}
    for t, qs in by_t.items():
        correct, offered = Counter(), Counter()
        for q in qs:
            correct[normalize_answer(q.correct)] += 1
            for c in q.choices:
                offered[normalize_answer(c)] += 1
        acc = Counter()
        for q in qs:
            keys = [normalize_answer(c) for c in q.choices]
            mine = keys[q.answer]
            others_correct = [correct[k] - (k == mine) for k in keys]
            others_offered = [offered[k] - 1 for k in keys]
            acc["count"] += _argmax_credit(others_correct, q.answer)
            acc["rate"] += _argmax_credit([c / o if o else CHANCE for c, o in zip(others_correct, others_offered)],
                                          q.answer)
            acc["all"] += _argmax_credit([correct[k] for k in keys], q.answer)
            sharing = [i for i, c in enumerate(q.choices) if _stems(c, stem_len) & _stems(q.concept, stem_len)]
            acc["stem"] += (q.answer in sharing) / len(sharing) if sharing else CHANCE
        out[t] = {"n": len(qs), **{k: v / len(qs) for k, v in acc.items()}}
    return out


def test_cheap_guessers_stay_near_chance(world, templates):
    """Prior-only and stem-overlap guessers stay within 10 points of chance on every template.
    Leave-one-out priors (count, rate) are bounded above only: where distractors are other
    questions' answers, leaving the question out makes its own answer look rarest, so they
    fall below chance without any information a model could use (docs/world-probe.md)."""
    acc = measure_guessers(world, templates)
    assert len(acc) >= 50, sorted(acc)
    bad = []
    for t, row in acc.items():
        for k in ("count", "rate", "all", "stem"):
            if row[k] > CHANCE + MARGIN + 1e-9:
                bad.append(f"{t} {k}={row[k]:.1%}")
        for k in ("all", "stem"):
            if row[k] < CHANCE - MARGIN - 1e-9:
                bad.append(f"{t} {k}={row[k]:.1%}")
        assert row["n"] >= 8, f"{t}: {row['n']} questions"
    assert not bad, bad


@pytest.mark.parametrize("stem_len", [3, 4, 5])
def test_no_answer_shares_a_stem_with_its_concept(world, stem_len):
    """Per question, stricter than the stem-overlap guesser: no answer ("Mexican peso" for
    Mexico, "Spanish" for Spain) shares a word prefix with its concept's name."""
    leaks = [f"{q.concept}: {q.correct}" for q in world.questions
             if _stems(q.correct, stem_len) & _stems(q.concept, stem_len)]
    assert not leaks, leaks


def _printed_table(builder, tmp_path, capsys):
    assert builder.main(["--output", str(tmp_path / "w.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("template "))
    return out[start:]


def test_builder_prints_the_guessers_measured_here(builder, world, templates, tmp_path, capsys):
    """The builder's per-template printout (copied into docs/world-probe.md) agrees with the
    independent measurement above, and most questions are in balanced blocks."""
    acc = measure_guessers(world, templates)
    # a block: 4 questions of a template with the same choices in the same order and 4
    # different answers (two blocks may happen to share their choices and order)
    groups = defaultdict(list)
    for q, t in zip(world.questions, templates):
        groups[(t, q.choices)].append(q.answer)
    outside = Counter()
    for (t, _), answers in groups.items():
        k = len(answers) // 4
        if not (len(answers) == 4 * k and set(Counter(answers).values()) == {k}):
            outside[t] += len(answers)
    rows = _printed_table(builder, tmp_path, capsys)
    printed = {}
    for line in rows[1:]:
        t, n, out, count, rate, all_, stem = line.split()
        printed[t] = (int(n), int(out), float(count), float(rate), float(all_), float(stem))
    assert set(printed) == set(acc)
    for t, row in acc.items():
        want = (row["n"], outside[t]) + tuple(round(100 * row[k], 1) for k in ("count", "rate", "all", "stem"))
        assert printed[t] == pytest.approx(want, abs=0.051), t
        assert outside[t] <= row["n"] // 3, f"{t}: {outside[t]} of {row['n']} questions outside a block"


def test_docs_show_the_current_guesser_table(builder, tmp_path, capsys):
    table = "\n".join(_printed_table(builder, tmp_path, capsys))
    assert table in DOC.read_text(encoding="utf-8"), (
        "docs/world-probe.md: the guesser table differs from scripts/build_world_probe.py's printout; paste it again")


def test_other_choice_only_heuristics_stay_near_chance(world, templates, builder):
    """Balanced blocks make every rule that reads only the choices score chance on each block:
    check a few more than the two required guessers, per template (at most chance + 10)."""
    numeric = {f"{cat}.{a.name}" for cat, attrs in builder.SCHEMA.items() for a in attrs if a.numeric}
    by_t = defaultdict(list)
    for q, t in zip(world.questions, templates):
        by_t[t].append(q)
    bad = []
    for t, qs in by_t.items():
        attr = t.split("/")[0]
        pooled = [q for u, g in by_t.items() if u.split("/")[0] == attr for q in g]  # both phrasings
        acc = Counter()
        for q in qs:
            keys = [normalize_answer(c) for c in q.choices]
            prior = Counter(normalize_answer(p.correct) for p in pooled if p.concept != q.concept)
            acc["attribute prior"] += _argmax_credit([prior[k] for k in keys], q.answer)
            acc["longest"] += _argmax_credit([len(c) for c in q.choices], q.answer)
            acc["shortest"] += _argmax_credit([-len(c) for c in q.choices], q.answer)
            if attr in numeric:
                nums = [int(re.match(r"\+?(\d+)", c).group(1)) for c in q.choices]
                ranks = sorted(nums)
                acc["middle value"] += _argmax_credit([-abs(ranks.index(x) - 1.5) for x in nums], q.answer)
        bad += [f"{t} {k}={v / len(qs):.1%}" for k, v in acc.items() if v / len(qs) > CHANCE + MARGIN + 1e-9]
    assert not bad, bad
