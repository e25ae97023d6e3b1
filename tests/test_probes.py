"""Probe JSONL parsing and validation: every error names the file and line."""

import json

import pytest

from specext.probes import ProbeError, load_probe, normalize_answer, read_jsonl, sample_concepts, write_jsonl

GOOD = {"concept": "Aldoria", "category": "country", "question": "What is the capital of Aldoria?",
        "choices": ["Velmora", "Paris", "Tallinn", "Gold"], "answer": 0, "tier": "high",
        "aliases": ["Velmora City"], "facts": ["Velmora is the capital of Aldoria."]}


def write(tmp_path, lines, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


def test_roundtrip(tmp_path):
    p = write(tmp_path, [GOOD, dict(GOOD, question="Which city is Aldoria's capital?", answer=1,
                                    choices=["Paris", "Velmora", "Tallinn", "Gold"])])
    qs = read_jsonl(p)
    assert qs[0].correct == "Velmora" and qs[1].correct == "Velmora" and qs[0].tier == "high"
    assert qs[0].source == f"{p}:1"
    assert qs[0].accepted_answers() == ("Velmora", "Velmora City")
    out = tmp_path / "out.jsonl"
    write_jsonl(qs, out)
    assert read_jsonl(out) == [q.__class__(**{**q.__dict__, "source": f"{out}:{i + 1}"}) for i, q in enumerate(qs)]


@pytest.mark.parametrize("line, msg", [
    ("{not json", r"invalid JSON"),
    ("[1, 2]", r"expected a JSON object, got list"),
    ({k: v for k, v in GOOD.items() if k != "choices"}, r"missing required field\(s\) choices"),
    (dict(GOOD, concept=""), r"'concept' must be a non-empty string"),
    (dict(GOOD, choices=["only one"]), r"'choices' must be a list of at least 2"),
    (dict(GOOD, choices="Velmora, Paris"), r"'choices' must be a list"),
    (dict(GOOD, choices=["Paris", "paris", "Gold"]), r"'choices' must be distinct"),
    (dict(GOOD, answer=4), r"'answer' must be an integer index in \[0, 3\], got 4"),
    (dict(GOOD, answer="0"), r"'answer' must be an integer index"),
    (dict(GOOD, answer=True), r"'answer' must be an integer index"),
    (dict(GOOD, aliases=[1]), r"'aliases' must be a list of non-empty strings"),
    (dict(GOOD, tier=[1]), r"'tier' must be a string"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, msg):
    p = write(tmp_path, [GOOD, "", line])  # blank line 2 is skipped; the bad one is line 3
    with pytest.raises(ProbeError, match=rf"{p}:3: {msg}"):
        read_jsonl(p)


def test_set_level_checks(tmp_path):
    p = write(tmp_path, [GOOD, dict(GOOD, category="city", question="Another question?")])
    with pytest.raises(ProbeError, match=rf"{p}:2: concept 'Aldoria' has category 'city' but {p}:1 gives 'country'"):
        load_probe(p)
    p = write(tmp_path, [GOOD, GOOD], "dup.jsonl")
    with pytest.raises(ProbeError, match=r"dup.jsonl:2: duplicate question for concept 'Aldoria'"):
        load_probe(p)
    p = write(tmp_path, [], "empty.jsonl")
    with pytest.raises(ProbeError, match="has no questions"):
        load_probe(p)
    with pytest.raises(FileNotFoundError, match="neither a built-in set"):
        load_probe(tmp_path / "missing.jsonl")


def test_indices_and_sampling(tmp_path):
    lines = []
    for cat in ("a", "b", "c"):
        for k in range(4):
            lines.append(dict(GOOD, concept=f"{cat}{k}", category=cat, question=f"q about {cat}{k}?"))
    probe = load_probe(write(tmp_path, lines))
    assert probe.categories == ["a", "b", "c"] and len(probe.concepts) == 12
    assert probe.concept_category == [0] * 4 + [1] * 4 + [2] * 4
    s = sample_concepts(probe, 4, seed=1)
    assert len(s.concepts) == 4 and set(s.categories) == {"a", "b", "c"}
    assert sample_concepts(probe, 4, seed=1).concepts == s.concepts
    assert load_probe(write(tmp_path, lines, "x.jsonl"), max_concepts=3).categories == ["a", "b", "c"]
    with pytest.raises(ValueError, match="max_concepts must be >= 1"):
        sample_concepts(probe, 0)


def test_normalize_answer():
    assert normalize_answer("The  Éiffel-Tower!") == "eiffel tower"
    assert normalize_answer("an apple") == "apple"
