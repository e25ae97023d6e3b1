#!/usr/bin/env python3
"""Build the built-in ``world`` probe set (real-world knowledge for real LLMs).

Reads the curated tables ``scripts/world_data/<category>.csv`` and writes
``python/specext/data/world.jsonl`` (the file ``specext.probes.load_probe("world")``
loads), deterministically: the same tables always give the same bytes.

    /work/venv/bin/python scripts/build_world_probe.py            # rebuild the shipped file
    /work/venv/bin/python scripts/build_world_probe.py -o /tmp/w.jsonl

Table format (UTF-8 CSV with a header, one concept a row):

``name``
    the concept (unique over all tables).
``display`` (optional)
    how questions name the concept when that differs from ``name``
    ("the United States", "gold").
``tier``
    frequency tier: ``high`` (extremely famous), ``medium`` or ``low`` (less famous, still real).
``facts``
    one or two plain sentences stating some of the concept's attributes, separated by ``|``.
``<attribute>``
    one column for each attribute of the category (``SCHEMA`` below): a short answer.
    An empty cell is an error; ``-`` marks an attribute that does not apply or has no
    unambiguous answer for this concept, allowed only for attributes marked optional.
``<attribute>_aliases`` (optional)
    other spellings of the value, ``|``-separated ("USA|US"); accepted in open-ended
    matching, never used as distractors.
``<attribute>_also`` (optional)
    other values that are also correct answers to the attribute's questions (co-founders,
    second official languages...); accepted in open-ended matching, never used as distractors.
``<attribute>_avoid`` (optional)
    values that are debatable for this concept (e.g. a country it was part of at the time);
    never used as distractors, not accepted either.

For each concept and each applicable attribute the script asks the attribute's two
question templates, each as a four-option multiple-choice question: the correct value and
three distractors drawn (seeded ``random.Random(0)``) from the same attribute's values of
other concepts of the same category: for numeric attributes (years, atomic numbers) among
the nearest values, otherwise preferably from concepts of the same group (``AFFINITY``:
capitals of countries on the same continent, works of physicists for a physicist...) so
that distractors are plausible. Answer positions are balanced over 0..3. ``aliases`` in the JSONL are the
value's aliases plus its ``_also`` values; ``facts`` the concept's sentences; ``tier`` the
table's tier.

The build fails with a message naming the table and line on: unknown or missing columns,
a missing value, a bad tier, a duplicate concept, a duplicate question, a distractor equal
to the answer or one of its aliases, a distractor that is also a correct (or avoided) answer,
an answer or alias that appears in its own question, a concept with fewer than 10
questions, a category with fewer than 25 concepts, fewer than 150 concepts in all. It then
re-reads the written file with ``specext.probes`` and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA_DIR = HERE / "world_data"
DEFAULT_OUTPUT = ROOT / "python" / "specext" / "data" / "world.jsonl"

try:
    from specext import probes
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "python"))
    from specext import probes

normalize_answer = probes.normalize_answer

SEED = 0
N_CHOICES = 4
NUMERIC_NEAREST = 6  # numeric distractors are drawn from the 6 nearest other values
MIN_QUESTIONS_PER_CONCEPT = 10
MIN_CONCEPTS_PER_CATEGORY = 25
MIN_CONCEPTS = 150
TIERS = ("high", "medium", "low")
NA = "-"


@dataclass(frozen=True)
class Attr:
    name: str
    templates: Tuple[str, str]  # formatted with display=... and the concept's other values
    numeric: bool = False  # distractors: nearest values (by the leading integer)
    optional: bool = False  # "-" allowed


# Category -> attributes, in question order. Categories are written in this order.
SCHEMA: Dict[str, Tuple[Attr, ...]] = {
    "person": (
        Attr("birth_country", ("In which present-day country was {display} born?",
                               "{display} was born in which present-day country?")),
        Attr("occupation", ("What was {display}'s main occupation?",
                            "Which profession is {display} best known for?")),
        Attr("known_for", ("Which of these is {display} best known for?",
                           "What is {display} most famous for?")),
        Attr("birth_year", ("In which year was {display} born?",
                            "What year was {display} born in?"), numeric=True),
        Attr("death_year", ("In which year did {display} die?",
                            "What year did {display} die in?"), numeric=True),
    ),
    "city": (
        Attr("country", ("In which country is {display} located?",
                         "{display} is a city in which country?")),
        Attr("continent", ("On which continent is {display} located?",
                           "Which continent is the city of {display} on?")),
        Attr("river", ("On which river does {display} lie?",
                       "Which river is {display} situated on?")),
        Attr("landmark", ("Which famous landmark is located in {display}?",
                          "Which of these landmarks can be found in {display}?")),
        Attr("language", ("What is the main language spoken in {display}?",
                          "Which language do most residents of {display} speak?")),
    ),
    "country": (
        Attr("capital", ("What is the capital of {display}?",
                         "Which city is the capital of {display}?")),
        Attr("continent", ("On which continent is {display} located?",
                           "Which continent is {display} part of?")),
        Attr("currency", ("What is the official currency of {display}?",
                          "Which currency is used in {display}?")),
        Attr("language", ("What is the most widely spoken language in {display}?",
                          "Which language do most people in {display} speak?")),
        Attr("calling_code", ("What is the international calling code of {display}?",
                              "Which international dialling code is used for phone calls to {display}?"),
             numeric=True),
    ),
    "element": (
        Attr("symbol", ("What is the chemical symbol of {display}?",
                        "Which symbol represents {display} on the periodic table?")),
        Attr("atomic_number", ("What is the atomic number of {display}?",
                               "How many protons does an atom of {display} have?"), numeric=True),
        Attr("category", ("Which class of elements does {display} belong to?",
                          "How is {display} classified on the periodic table?")),
        Attr("period", ("In which period of the periodic table is {display}?",
                        "Which row (period) of the periodic table contains {display}?"), numeric=True),
        Attr("group", ("Which group of the periodic table is {display} in?",
                       "What is the group number of {display} in the periodic table?"),
             numeric=True, optional=True),
        Attr("discovered_by", ("Who discovered {display}?",
                               "Which scientist is credited with discovering {display}?"), optional=True),
    ),
    "company": (
        Attr("founded", ("In which year was {display} founded?",
                         "What year was {display} established?"), numeric=True),
        Attr("country", ("In which country was {display} founded?",
                         "Which country does the company {display} come from?")),
        Attr("founder", ("Who founded {display}?",
                         "Which person was a founder of {display}?")),
        Attr("industry", ("In which industry does {display} primarily operate?",
                          "What is the main business of {display}?")),
        Attr("product", ("Which product is {display} best known for?",
                         "Which of these is a well-known product of {display}?")),
    ),
    "work": (
        Attr("creator", ("Who created {display}?",
                         "Which artist or writer is the creator of {display}?")),
        Attr("type", ("What kind of work is {display} by {creator}?",
                      "Which of these describes {display}, created by {creator}?")),
        Attr("nationality", ("What was the nationality of the creator of {display}?",
                             "{display} was created by an artist or writer of which nationality?")),
        Attr("year", ("In which year was {display} completed or first released?",
                      "What year is {display} from?"), numeric=True, optional=True),
        Attr("century", ("In which century was {display} created?",
                         "From which century does {display} date?"), numeric=True),
        Attr("language", ("What is the original language of {display}?",
                          "Which language was {display} originally produced in?"), optional=True),
        Attr("location", ("In which museum or building can {display} be seen?",
                          "Where is {display} displayed today?"), optional=True),
        Attr("protagonist", ("Who is the main character of {display}?",
                             "Which character is the protagonist of {display}?"), optional=True),
    ),
}

# Distractors for non-numeric attributes come preferably from concepts that share this
# attribute's value (e.g. other European capitals for a European country).
AFFINITY: Dict[str, str] = {
    "person": "occupation",
    "city": "continent",
    "country": "continent",
    "element": "category",
    "company": "industry",
    "work": "type",
}
assert all(any(a.name == AFFINITY[c] for a in attrs) for c, attrs in SCHEMA.items())

_SUFFIXES = ("aliases", "also", "avoid")


class BuildError(ValueError):
    """Bad table data or a failed check; the message names the table and line."""


@dataclass(frozen=True)
class Value:
    text: str
    aliases: Tuple[str, ...] = ()
    also: Tuple[str, ...] = ()
    avoid: Tuple[str, ...] = ()

    def accepted(self) -> Tuple[str, ...]:
        """The value, its aliases and the other correct values."""
        return (self.text,) + self.aliases + self.also

    def keys(self) -> set:
        """Normalized forms of the value and its aliases (what counts as 'the same value')."""
        return {normalize_answer(s) for s in (self.text,) + self.aliases}

    def forbidden(self) -> set:
        """Normalized forms that must never be a distractor for this value."""
        return {normalize_answer(s) for s in self.accepted() + self.avoid}


@dataclass
class Concept:
    name: str
    display: str
    category: str
    tier: str
    facts: Tuple[str, ...]
    values: Dict[str, Optional[Value]]  # None: not applicable ("-")
    src: str  # "person.csv:12"

    def where(self) -> str:
        return f"{self.src} ({self.name})"


def _split(cell: Optional[str]) -> Tuple[str, ...]:
    return tuple(x.strip() for x in (cell or "").split("|") if x.strip())


def _number(text: str) -> Optional[int]:
    m = re.match(r"\+?(\d+)", text)
    return int(m.group(1)) if m else None


def _template_fields(template: str) -> List[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def read_table(path: Path, category: str) -> List[Concept]:
    attrs = SCHEMA[category]
    names = [a.name for a in attrs]
    if not path.is_file():
        raise BuildError(f"{path}: missing table for category '{category}'")
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        allowed = {"name", "display", "tier", "facts"} | set(names) | {f"{n}_{s}" for n in names for s in _SUFFIXES}
        unknown = [c for c in header if c not in allowed]
        if unknown:
            raise BuildError(f"{path.name}:1: unknown column(s) {unknown}")
        missing = [c for c in ["name", "tier", "facts"] + names if c not in header]
        if missing:
            raise BuildError(f"{path.name}:1: missing column(s) {missing}")
        if len(set(header)) != len(header):
            raise BuildError(f"{path.name}:1: duplicate column names in {header}")
        concepts = []
        for row in reader:
            src = f"{path.name}:{reader.line_num}"
            if None in row:
                raise BuildError(f"{src}: more cells than columns: {row[None]!r}")
            name = (row.get("name") or "").strip()
            if not name:
                raise BuildError(f"{src}: empty 'name'")
            where = f"{src} ({name})"
            tier = (row.get("tier") or "").strip()
            if tier not in TIERS:
                raise BuildError(f"{where}: tier must be one of {TIERS}, got {tier!r}")
            facts = _split(row.get("facts"))
            if not facts:
                raise BuildError(f"{where}: missing 'facts'")
            values: Dict[str, Optional[Value]] = {}
            for a in attrs:
                text = (row.get(a.name) or "").strip()
                extra = {s: _split(row.get(f"{a.name}_{s}")) for s in _SUFFIXES}
                if not text:
                    raise BuildError(f"{where}: missing value for attribute '{a.name}'")
                if text == NA:
                    if not a.optional:
                        raise BuildError(f"{where}: attribute '{a.name}' is required ('-' is not allowed)")
                    if any(extra.values()):
                        raise BuildError(f"{where}: attribute '{a.name}' is '-' but has aliases/also/avoid")
                    values[a.name] = None
                    continue
                if not normalize_answer(text):
                    raise BuildError(f"{where}: value {text!r} of '{a.name}' is empty after normalization")
                if a.numeric and _number(text) is None:
                    raise BuildError(f"{where}: numeric attribute '{a.name}' has non-numeric value {text!r}")
                v = Value(text, extra["aliases"], extra["also"], extra["avoid"])
                clash = v.keys() & {normalize_answer(s) for s in v.avoid}
                if clash:
                    raise BuildError(f"{where}: '{a.name}' lists {sorted(clash)} both as a correct answer and in _avoid")
                values[a.name] = v
            n_attrs = sum(v is not None for v in values.values())
            if 2 * n_attrs < MIN_QUESTIONS_PER_CONCEPT:
                raise BuildError(f"{where}: only {n_attrs} attribute(s) apply, giving {2 * n_attrs} questions; "
                                 f"at least {MIN_QUESTIONS_PER_CONCEPT} are needed")
            display = (row.get("display") or "").strip() or name
            concepts.append(Concept(name, display, category, tier, facts, values, src))
    if len(concepts) < MIN_CONCEPTS_PER_CATEGORY:
        raise BuildError(f"{path.name}: category '{category}' has {len(concepts)} concept(s); "
                         f"at least {MIN_CONCEPTS_PER_CATEGORY} are needed")
    return concepts


def read_tables(data_dir: Path) -> List[Concept]:
    concepts: List[Concept] = []
    seen: Dict[str, Concept] = {}
    for category in SCHEMA:
        for c in read_table(data_dir / f"{category}.csv", category):
            key = normalize_answer(c.name)
            if key in seen:
                raise BuildError(f"{c.where()}: duplicate concept, first defined at {seen[key].where()}")
            seen[key] = c
            concepts.append(c)
    extra = sorted(p.name for p in data_dir.glob("*.csv") if p.stem not in SCHEMA)
    if extra:
        raise BuildError(f"{data_dir}: table(s) {extra} are not categories of the schema ({', '.join(SCHEMA)})")
    if len(seen) < MIN_CONCEPTS:
        raise BuildError(f"{data_dir}: {len(seen)} concepts in all; at least {MIN_CONCEPTS} are needed")
    return concepts


def _distractor_pools(concept: Concept, attr: Attr, peers: Sequence[Concept]) -> Tuple[List[str], List[str]]:
    """Values of ``attr`` from other concepts of the category that are safe distractors, one
    per distinct value (first occurrence in table order), as (preferred, others): for numeric
    attributes the nearest values and nothing else, otherwise the values of concepts in the
    same ``AFFINITY`` group and the rest."""
    own = concept.values[attr.name]
    forbidden = own.forbidden()
    group_attr = AFFINITY[concept.category]
    group = normalize_answer(concept.values[group_attr].text)
    preferred: List[str] = []
    others: List[str] = []
    taken: set = set()
    # same-group concepts first, so that a value shared across groups counts as same-group
    ordered = sorted(peers, key=lambda o: normalize_answer(o.values[group_attr].text) != group)
    for other in ordered:
        if other is concept or other.values[attr.name] is None:
            continue
        v = other.values[attr.name]
        keys = v.keys()
        if keys & forbidden or keys & taken:
            continue
        taken |= keys
        same = normalize_answer(other.values[group_attr].text) == group
        (preferred if same else others).append(v.text)
    if attr.numeric:
        target = _number(own.text)
        pool = sorted(preferred + others, key=lambda s: (abs(_number(s) - target), _number(s)))
        return pool[:max(NUMERIC_NEAREST, N_CHOICES - 1)], []
    return preferred, others


def _pick_distractors(rng: random.Random, preferred: List[str], others: List[str]) -> List[str]:
    k = N_CHOICES - 1
    if len(preferred) >= k:
        return rng.sample(preferred, k)
    picked = preferred + rng.sample(others, k - len(preferred))
    rng.shuffle(picked)
    return picked


def _leaks(question: str, answers: Sequence[str]) -> List[str]:
    """Answers whose normalized form appears, as whole words, in the normalized question."""
    q = f" {normalize_answer(question)} "
    return [a for a in answers if normalize_answer(a) and f" {normalize_answer(a)} " in q]


def check_question(c: Concept, attr: Attr, q: "probes.Question") -> None:
    """The per-question checks (also guards the generator itself)."""
    where = c.where()
    v = c.values[attr.name]
    own = v.keys()
    others = {normalize_answer(s) for s in v.also + v.avoid}
    if len(q.choices) != N_CHOICES or len({normalize_answer(x) for x in q.choices}) != N_CHOICES:
        raise BuildError(f"{where}: '{attr.name}' question {q.question!r} needs {N_CHOICES} distinct choices, "
                         f"got {list(q.choices)}")
    if q.choices[q.answer] != v.text:
        raise BuildError(f"{where}: '{attr.name}' answer index does not point at {v.text!r}")
    for i, d in enumerate(q.choices):
        if i == q.answer:
            continue
        k = normalize_answer(d)
        if k in own:
            raise BuildError(f"{where}: distractor {d!r} equals the correct answer {v.text!r} of "
                             f"'{attr.name}' or one of its aliases")
        if k in others:
            raise BuildError(f"{where}: distractor {d!r} is also a correct (or debatable) answer of "
                             f"'{attr.name}' for this concept")
    leaked = _leaks(q.question, v.accepted())
    if leaked:
        raise BuildError(f"{where}: answer {leaked[0]!r} of '{attr.name}' appears in its question {q.question!r}")


def build_questions(concepts: Sequence[Concept], seed: int = SEED) -> List["probes.Question"]:
    rng = random.Random(seed)
    slots: List[int] = []
    by_cat: Dict[str, List[Concept]] = {}
    for c in concepts:
        by_cat.setdefault(c.category, []).append(c)
    out: List[probes.Question] = []
    seen_q: Dict[str, str] = {}
    for c in concepts:
        n_before = len(out)
        fields = {n: v.text for n, v in c.values.items() if v is not None}
        for attr in SCHEMA[c.category]:
            v = c.values[attr.name]
            if v is None:
                continue
            preferred, others = _distractor_pools(c, attr, by_cat[c.category])
            if len(preferred) + len(others) < N_CHOICES - 1:
                raise BuildError(f"{c.where()}: only {len(preferred) + len(others)} usable distractor value(s) "
                                 f"for '{attr.name}' ({preferred + others}); {N_CHOICES - 1} needed")
            seen_k = {normalize_answer(v.text)}
            aliases = []
            for s in v.aliases + v.also:
                k = normalize_answer(s)
                if k and k not in seen_k:
                    seen_k.add(k)
                    aliases.append(s)
            for template in attr.templates:
                missing = [f for f in _template_fields(template) if f != "display" and f not in fields]
                if missing:
                    raise BuildError(f"{c.where()}: template {template!r} of '{attr.name}' needs "
                                     f"attribute(s) {missing}, which do not apply")
                text = template.format(display=c.display, **fields)
                text = text[0].upper() + text[1:]
                key = normalize_answer(text)
                if key in seen_q:
                    raise BuildError(f"{c.where()}: duplicate question {text!r} (first at {seen_q[key]})")
                seen_q[key] = c.where()
                distractors = _pick_distractors(rng, preferred, others)
                if not slots:
                    slots = list(range(N_CHOICES))
                    rng.shuffle(slots)
                pos = slots.pop()
                choices = distractors[:pos] + [v.text] + distractors[pos:]
                q = probes.Question(concept=c.name, category=c.category, question=text, choices=tuple(choices),
                                    answer=pos, tier=c.tier, aliases=tuple(aliases), facts=c.facts)
                check_question(c, attr, q)
                out.append(q)
        if len(out) - n_before < MIN_QUESTIONS_PER_CONCEPT:
            raise BuildError(f"{c.where()}: {len(out) - n_before} question(s); "
                             f"at least {MIN_QUESTIONS_PER_CONCEPT} are needed")
    return out


def summarize(probe: "probes.ProbeSet") -> str:
    cats = probe.categories
    tiers = [t for t in TIERS if t in set(probe.concept_tier)]
    counts = Counter(zip(probe.concept_category, probe.concept_tier))
    q_per_cat = Counter(q.category for q in probe.questions)
    width = max(len(c) for c in cats + ["category", "total"])
    lines = [f"{'category':<{width}}  " + "  ".join(f"{t:>6}" for t in tiers) + "  concepts  questions"]
    for k, cat in enumerate(cats):
        row = [counts[(k, t)] for t in tiers]
        lines.append(f"{cat:<{width}}  " + "  ".join(f"{n:>6}" for n in row) + f"  {sum(row):>8}  {q_per_cat[cat]:>9}")
    tot = [sum(counts[(k, t)] for k in range(len(cats))) for t in tiers]
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{n:>6}" for n in tot)
                 + f"  {len(probe.concepts):>8}  {len(probe.questions):>9}")
    hist = Counter(q.answer for q in probe.questions)
    n = len(probe.questions)
    lines.append("answer positions: " + ", ".join(f"{i}: {hist[i]} ({100 * hist[i] / n:.1f}%)"
                                                  for i in range(N_CHOICES)))
    return "\n".join(lines)


def build(data_dir: Path = DEFAULT_DATA_DIR, output: Path = DEFAULT_OUTPUT, seed: int = SEED) -> "probes.ProbeSet":
    concepts = read_tables(Path(data_dir))
    questions = build_questions(concepts, seed=seed)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    probes.write_jsonl(questions, output)
    probe = probes.ProbeSet("world", probes.read_jsonl(output))
    probes.check_probe(probe, min_concepts=MIN_CONCEPTS)
    if len(probe.questions) != len(questions) or len(probe.concepts) != len(concepts):
        raise BuildError(f"{output}: re-read {len(probe.questions)} questions / {len(probe.concepts)} concepts, "
                         f"wrote {len(questions)} / {len(concepts)}")
    return probe


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of <category>.csv tables")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSONL file to write")
    ap.add_argument("-q", "--quiet", action="store_true", help="no summary")
    args = ap.parse_args(argv)
    try:
        probe = build(args.data_dir, args.output)
    except (BuildError, probes.ProbeError) as e:
        print(f"build_world_probe: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {args.output}")
        print(summarize(probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
