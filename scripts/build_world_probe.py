#!/usr/bin/env python3
"""Build the built-in ``world`` probe set (real-world knowledge for real LLMs).

Reads the curated tables ``scripts/world_data/<category>.csv`` and writes
``python/specext/data/world.jsonl`` (the file ``specext.probes.load_probe("world")``
loads), deterministically: the same tables always give the same bytes.
``docs/world-probe.md`` explains the design; its guesser table is this script's printout.

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
    other names or spellings of the *same* answer, ``|``-separated ("USA|US", "Tevere" for
    the Tiber); accepted in open-ended matching, never used as distractors.
``<attribute>_also`` (optional)
    other answers that are correct *in the same sense* because the question genuinely has
    several (the co-founders of a company, the co-discoverers of an element, the other
    rivers a city lies on, the United Kingdom for someone born in England); accepted in
    open-ended matching, never used as distractors. Not for an answer in a weaker sense:
    a second official language is not "the main language", a secondary occupation is not
    "the main occupation"; those go to ``_avoid``.
``<attribute>_avoid`` (optional)
    values that are debatable for this concept (a second official language, the country it
    belonged to at the time, a predecessor company's founding year); never used as
    distractors, not accepted either.

The alias rule is checked: an accepted answer (``_aliases`` or ``_also``) that is another
concept's value of the same attribute is a build error (it cannot be another name of this
concept's answer, and it would make that concept's answer a correct reply here).

Questions. For each concept and each attribute it is asked, the script asks the attribute's
two question templates, each a four-option multiple-choice question whose distractors are
the same attribute's values of other concepts of the category. Distractors carry no cheap
signal, by construction:

* *Balanced blocks.* The questions of a template are partitioned into blocks of four
  concepts with four different answers; the four questions of a block share the same four
  choices in the same order, so within the blocks each value is offered exactly four times
  as often as it is correct, and any rule that looks only at the choices (their texts, order,
  lengths or numeric ranks) is right on exactly one question of each block. Blocks are drawn (seeded, ``random.Random``) from
  concepts of the same group (``AFFINITY``: countries of one continent, elements of one
  class...) and, for numeric attributes, from the nearest values, so that distractors stay
  plausible. The questions left over (the remainder of the division by four, and those that
  ``_avoid`` lists keep out of every block) take three distractors that are at least as
  often correct as their answer.
* *Balanced answers.* A template can only be balanced if no answer is correct on more than a
  quarter of its questions. Where one is (Europe for cities, the United States for
  companies...), the attribute is asked for only as many concepts with that answer as there
  are blocks (those with the fewest other questions first); if fewer than
  ``MIN_TEMPLATE_QUESTIONS`` questions remain, the attribute is not asked at all.
* *No answer named after the concept.* An attribute is not asked for a concept whose answer
  shares a word stem with the concept's name ("Mexican peso" for Mexico, "German" for
  Germany; ``LEAK_STEM_LEN``-letter prefixes, stricter than the guesser below), and a block
  never offers a choice that shares such a stem with one of its concepts.

The script then measures, per template, two cheap guessers that never read the question
(``guesser_accuracy``), prints them, and fails the build if one does better than chance
(1/4) plus ``GUESSER_MARGIN``:

* prior-only: pick the choice that is most often the correct answer of the *other* questions
  of the template; three variants: ``count`` (leave-one-out number of times correct),
  ``rate`` (leave-one-out times correct / times offered; a choice never offered elsewhere
  rates 1/4) and ``all`` (counts over all the template's questions, the question itself
  included: biased towards the answer; required to stay within the margin on both sides,
  like the stem guesser). Ties: fractional credit 1/k.
* stem-overlap: the choices that share a word stem (first ``STEM_LEN`` letters of a word of at
  least that many letters, casefolded, accents, articles and punctuation stripped) with the
  concept's name; exactly one: pick it; several: 1/k credit if the answer is among them;
  none: chance.

Leave-one-out guessers score below chance wherever distractors are other concepts' answers
(the question's own answer is the one choice that loses a count); that is a property of the
estimate, not information a model answering one question can use.

``aliases`` in the JSONL are the value's aliases plus its ``_also`` values; ``facts`` the
concept's sentences; ``tier`` the table's tier. The build fails with a message naming the
table and line on: unknown or missing columns, a missing value, a bad tier, a duplicate
concept, an accepted answer that is another concept's value, a duplicate question, a
distractor that is the answer, an accepted or an avoided answer, an answer or alias that
appears in its own question, a concept with fewer than ``MIN_QUESTIONS_PER_CONCEPT``
questions, a category with fewer than 25 concepts, fewer than 150 concepts in all, a guesser
outside its bound. It then re-reads the written file with ``specext.probes`` and prints a
summary.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import string
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

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
CHANCE = 1.0 / N_CHOICES
GUESSER_MARGIN = 0.10  # per template, every guesser <= chance + this (GUESSER_BOUNDS)
# 3 attributes asked twice. Was 10 before the balancing: a country has only its capital and
# calling code besides a continent or a language that balancing and the stem rule allow.
MIN_QUESTIONS_PER_CONCEPT = 6
MIN_TEMPLATE_QUESTIONS = 8  # an attribute balanced down to fewer questions (2 blocks) is not asked
MIN_CONCEPTS_PER_CATEGORY = 25
MIN_CONCEPTS = 150
STEM_LEN = 4  # the stem-overlap guesser
LEAK_STEM_LEN = 3  # the builder's own stem rule: stricter (catches Spain/Spanish, Brazil/Brasília)
STEM_STOPWORDS = frozenset({"and", "for", "von", "van", "der", "den", "del", "des", "les", "las", "los"})
PARTITION_ATTEMPTS = 48
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

# Blocks of distractors are drawn preferably from concepts that share this attribute's value
# (e.g. European capitals for a European country).
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


def word_stems(text: str, n: int = STEM_LEN) -> FrozenSet[str]:
    """The ``n``-letter prefixes of the words of ``text`` that have at least ``n`` letters
    (normalized as in open-ended matching: casefolded, accents, articles and punctuation
    stripped; numbers and a few particles such as "van" or "del" are not words here)."""
    return frozenset(w[:n] for w in normalize_answer(text).split()
                     if len(w) >= n and not w.isdigit() and w not in STEM_STOPWORDS)


def concept_stems(c: Concept, n: int = STEM_LEN) -> FrozenSet[str]:
    return word_stems(c.name, n) | word_stems(c.display, n)


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
                clash = {normalize_answer(s) for s in v.accepted()} & {normalize_answer(s) for s in v.avoid}
                if clash:
                    raise BuildError(f"{where}: '{a.name}' lists {sorted(clash)} both as a correct answer and in _avoid")
                values[a.name] = v
            display = (row.get("display") or "").strip() or name
            concepts.append(Concept(name, display, category, tier, facts, values, src))
    if len(concepts) < MIN_CONCEPTS_PER_CATEGORY:
        raise BuildError(f"{path.name}: category '{category}' has {len(concepts)} concept(s); "
                         f"at least {MIN_CONCEPTS_PER_CATEGORY} are needed")
    return concepts


def check_accepted_answers(concepts: Sequence[Concept]) -> None:
    """An accepted answer (``_aliases``/``_also``) must not be another concept's value of the
    same attribute: then it is a different answer, not another name of this one."""
    owners: Dict[Tuple[str, str, str], Concept] = {}
    for c in concepts:
        for name, v in c.values.items():
            if v is not None:
                owners.setdefault((c.category, name, normalize_answer(v.text)), c)
    for c in concepts:
        for name, v in c.values.items():
            if v is None:
                continue
            own = normalize_answer(v.text)
            for suffix, extra in (("aliases", v.aliases), ("also", v.also)):
                for s in extra:
                    k = normalize_answer(s)
                    other = owners.get((c.category, name, k))
                    if k != own and other is not None and other is not c:
                        raise BuildError(
                            f"{c.where()}: '{name}_{suffix}' accepts {s!r}, which is the answer of '{name}' "
                            f"for {other.where()}: an accepted answer must be another name of this answer "
                            f"(or an answer correct in the same sense), not another concept's answer; "
                            f"list it under '{name}_avoid'")


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
    check_accepted_answers(concepts)
    return concepts


# --------------------------------------------------------------------------- which questions


@dataclass
class Plan:
    """Which concepts each attribute is asked for, and why the others are not."""

    asked: Dict[Tuple[str, str], List[Concept]] = field(default_factory=dict)  # (category, attr) -> concepts
    stem_skipped: Dict[Tuple[str, str], List[Concept]] = field(default_factory=dict)
    capped: Dict[Tuple[str, str], Dict[str, Tuple[int, int]]] = field(default_factory=dict)  # value -> (kept, of)
    dropped: Dict[Tuple[str, str], str] = field(default_factory=dict)  # attribute not asked at all: why


def max_blocks(counts: Sequence[int]) -> int:
    """The largest number of blocks of N_CHOICES different answers that questions with these
    per-answer counts can fill (each answer at most once per block)."""
    b = 0
    while sum(min(n, b + 1) for n in counts) >= N_CHOICES * (b + 1):
        b += 1
    return b


def plan_questions(concepts: Sequence[Concept]) -> Plan:
    plan = Plan()
    order = {id(c): i for i, c in enumerate(concepts)}
    by_cat: Dict[str, List[Concept]] = defaultdict(list)
    for c in concepts:
        by_cat[c.category].append(c)
    groups: Dict[Tuple[str, str], Dict[str, List[Concept]]] = {}
    for cat, attrs in SCHEMA.items():
        for a in attrs:
            items, skipped = [], []
            for c in by_cat[cat]:
                v = c.values[a.name]
                if v is None:
                    continue
                (skipped if word_stems(v.text, LEAK_STEM_LEN) & concept_stems(c, LEAK_STEM_LEN) else items).append(c)
            if skipped:
                plan.stem_skipped[(cat, a.name)] = skipped
            g: Dict[str, List[Concept]] = defaultdict(list)
            for c in items:
                g[normalize_answer(c.values[a.name].text)].append(c)
            b = max_blocks([len(x) for x in g.values()])
            kept = sum(min(len(x), b) for x in g.values())
            plan.asked[(cat, a.name)] = items
            if kept < MIN_TEMPLATE_QUESTIONS:
                top = max(g.values(), key=len) if g else []
                plan.dropped[(cat, a.name)] = (
                    f"only {kept} of its {len(items) + len(skipped)} questions can be balanced"
                    + (f" ({top[0].values[a.name].text!r} is the answer for {len(top)})" if top else "")
                    + (f"; the answer shares a word stem with the name for {len(skipped)}" if skipped else ""))
                plan.asked[(cat, a.name)] = []
            else:
                groups[(cat, a.name)] = g
    asked_n: Counter = Counter(id(c) for cs in plan.asked.values() for c in cs)
    # Cap over-represented answers; the concepts with the fewest other questions keep theirs.
    for (cat, name), g in groups.items():
        b = max_blocks([len(x) for x in g.values()])
        capped: Dict[str, Tuple[int, int]] = {}
        keep = set()
        for x in g.values():
            x = sorted(x, key=lambda c: (asked_n[id(c)], order[id(c)]))
            if len(x) > b:
                capped[x[0].values[name].text] = (b, len(x))
                for c in x[b:]:
                    asked_n[id(c)] -= 1
            keep.update(id(c) for c in x[:b])
        if capped:
            plan.capped[(cat, name)] = capped
        plan.asked[(cat, name)] = [c for c in plan.asked[(cat, name)] if id(c) in keep]
    return plan


# --------------------------------------------------------------------------- distractors


@dataclass(frozen=True)
class _Item:
    concept: Concept
    value: Value
    key: str  # normalized value
    keys: FrozenSet[str]  # normalized value and aliases
    forbidden: FrozenSet[str]  # never offered for this concept
    group: str  # normalized AFFINITY value
    number: Optional[int]
    stems: FrozenSet[str]  # LEAK_STEM_LEN stems of the concept
    value_stems: FrozenSet[str]  # LEAK_STEM_LEN stems of the value


def _item(c: Concept, attr: Attr) -> _Item:
    v = c.values[attr.name]
    g = c.values[AFFINITY[c.category]]
    return _Item(c, v, normalize_answer(v.text), frozenset(v.keys()), frozenset(v.forbidden()),
                 normalize_answer(g.text) if g is not None else "", _number(v.text) if attr.numeric else None,
                 concept_stems(c, LEAK_STEM_LEN), word_stems(v.text, LEAK_STEM_LEN))


def _offerable(value: _Item, to: _Item) -> bool:
    """Whether ``value``'s answer can be a choice of ``to``'s question."""
    return (value.key != to.key and not (value.keys & to.forbidden) and not (value.keys & to.keys)
            and not (value.value_stems & to.stems))


def _compatible(a: _Item, b: _Item) -> bool:
    return _offerable(a, b) and _offerable(b, a)


def _closeness(attr: Attr, cand: _Item, block: List[_Item]) -> float:
    """Lower is more plausible: the block's spread of values (numeric) or whether the
    candidate is from another group than the block's first member."""
    if attr.numeric:
        nums = [x.number for x in block] + [cand.number]
        return float(max(nums) - min(nums))
    return float(cand.group != block[0].group)


def _greedy_blocks(order: List[int], items: Sequence[_Item], attr: Attr,
                   compatible: List[set]) -> Tuple[List[List[int]], List[int]]:
    remaining = list(order)
    blocks: List[List[int]] = []
    left: List[int] = []
    while len(remaining) >= N_CHOICES:
        n_blocks = len(remaining) // N_CHOICES
        counts = Counter(items[i].key for i in remaining)
        urgent = {k for k, n in counts.items() if n >= n_blocks}  # must go into this block
        seed = next((i for i in remaining if items[i].key in urgent), remaining[0])
        block = [seed]
        pos = {i: r for r, i in enumerate(remaining)}
        while len(block) < N_CHOICES:
            cands = [i for i in remaining if all(i in compatible[j] for j in block)]
            if not cands:
                break
            members = [items[j] for j in block]
            block.append(min(cands, key=lambda i: (items[i].key not in urgent,
                                                   _closeness(attr, items[i], members), pos[i])))
        if len(block) < N_CHOICES:
            left.append(seed)
            remaining.remove(seed)
            continue
        blocks.append(block)
        taken = set(block)
        remaining = [i for i in remaining if i not in taken]
    return blocks, left + remaining


def _cost(attr: Attr, blocks: List[List[_Item]]) -> float:
    if attr.numeric:
        return float(sum(max(x.number for x in b) - min(x.number for x in b) for b in blocks))
    return float(sum(x.group != b[0].group for b in blocks for x in b))


def partition(items: Sequence[_Item], attr: Attr, rng: random.Random,
              descending: bool = False) -> Tuple[List[List[_Item]], List[_Item]]:
    """Blocks of N_CHOICES items with different, mutually offerable answers, plus the items
    left over; the best (fewest left over, then most plausible) of PARTITION_ATTEMPTS seeded
    greedy attempts."""
    n = len(items)
    compatible = [{j for j in range(n) if j != i and _compatible(items[i], items[j])} for i in range(n)]
    best = None
    for _ in range(PARTITION_ATTEMPTS):
        if attr.numeric:
            order = sorted(range(n), key=lambda i: (items[i].number * (-1 if descending else 1), rng.random()))
        else:
            groups = sorted({x.group for x in items})
            rng.shuffle(groups)
            rank = {g: r for r, g in enumerate(groups)}
            order = sorted(range(n), key=lambda i: (rank[items[i].group], rng.random()))
        blocks, left = _greedy_blocks(order, items, attr, compatible)
        blocks_i = [[items[i] for i in b] for b in blocks]
        cost = (len(left), _cost(attr, blocks_i))
        if best is None or cost < best[0]:
            best = (cost, blocks_i, [items[i] for i in left])
    return best[1], best[2]


def _leftover_distractors(item: _Item, items: Sequence[_Item], attr: Attr, counts: Counter,
                          rng: random.Random) -> List[str]:
    """Three distractors for a question outside the blocks: offerable values, preferably at
    least as often correct as its answer (so that no prior favours the answer), then the most
    plausible ones."""
    seen, cands = set(), []
    for x in items:
        if x.key not in seen and _offerable(x, item):
            seen.add(x.key)
            cands.append(x)
    rng.shuffle(cands)

    def score(x: _Item):
        near = abs(x.number - item.number) if attr.numeric else float(x.group != item.group)
        return (counts[x.key] < counts[item.key], near)

    cands.sort(key=score)
    picked: List[_Item] = []
    for x in cands:
        if all(not (x.keys & y.keys) for y in picked):
            picked.append(x)
        if len(picked) == N_CHOICES - 1:
            break
    if len(picked) < N_CHOICES - 1:
        raise BuildError(f"{item.concept.where()}: only {len(picked)} usable distractor value(s) for "
                         f"'{attr.name}' ({[x.value.text for x in picked]}); {N_CHOICES - 1} needed")
    return [x.value.text for x in picked]


def _leaks(question: str, answers: Sequence[str]) -> List[str]:
    """Answers whose normalized form appears, as whole words, in the normalized question."""
    q = f" {normalize_answer(question)} "
    return [a for a in answers if normalize_answer(a) and f" {normalize_answer(a)} " in q]


def check_question(c: Concept, attr: Attr, q: "probes.Question") -> None:
    """The per-question checks (also guards the generator itself)."""
    where = c.where()
    v = c.values[attr.name]
    if len(q.choices) != N_CHOICES or len({normalize_answer(x) for x in q.choices}) != N_CHOICES:
        raise BuildError(f"{where}: '{attr.name}' question {q.question!r} needs {N_CHOICES} distinct choices, "
                         f"got {list(q.choices)}")
    if q.choices[q.answer] != v.text:
        raise BuildError(f"{where}: '{attr.name}' answer index does not point at {v.text!r}")
    accepted = {normalize_answer(s) for s in v.accepted()} | {normalize_answer(s) for s in q.aliases}
    avoided = {normalize_answer(s) for s in v.avoid}
    for i, d in enumerate(q.choices):
        if i == q.answer:
            continue
        k = normalize_answer(d)
        if k == normalize_answer(v.text):
            raise BuildError(f"{where}: distractor {d!r} equals the correct answer {v.text!r} of '{attr.name}'")
        if k in accepted:
            raise BuildError(f"{where}: distractor {d!r} is an accepted answer (alias) of '{attr.name}' "
                             f"for this concept")
        if k in avoided:
            raise BuildError(f"{where}: distractor {d!r} is a debatable (avoided) answer of '{attr.name}' "
                             f"for this concept")
    leaked = _leaks(q.question, v.accepted())
    if leaked:
        raise BuildError(f"{where}: answer {leaked[0]!r} of '{attr.name}' appears in its question {q.question!r}")


def template_id(category: str, attr: str, index: int) -> str:
    """``country.capital/1``: the first template of the attribute."""
    return f"{category}.{attr}/{index + 1}"


@dataclass
class Build:
    questions: List["probes.Question"]
    templates: List[str]  # template_id of each question
    plan: Plan
    outside: Dict[str, int]  # template_id -> questions not in a block


def build_questions(concepts: Sequence[Concept], seed: int = SEED) -> Build:
    plan = plan_questions(concepts)
    slot_rng = random.Random(seed)
    slots: List[int] = []
    # (concept id, attr, template index) -> (choices, answer)
    made: Dict[Tuple[int, str, int], Tuple[List[str], int]] = {}
    outside: Dict[str, int] = {}
    for cat, attrs in SCHEMA.items():
        for a in attrs:
            asked = plan.asked[(cat, a.name)]
            if not asked:
                continue
            items = [_item(c, a) for c in asked]
            counts = Counter(x.key for x in items)
            for t in range(len(a.templates)):
                rng = random.Random(f"{seed}:{template_id(cat, a.name, t)}")
                blocks, left = partition(items, a, rng, descending=bool(t % 2))
                outside[template_id(cat, a.name, t)] = len(left)
                for block in blocks:
                    perm = list(range(N_CHOICES))
                    rng.shuffle(perm)  # choices[j] is block[perm[j]]'s answer
                    choices = [block[perm[j]].value.text for j in range(N_CHOICES)]
                    for m, x in enumerate(block):
                        made[(id(x.concept), a.name, t)] = (choices, perm.index(m))
                for x in left:
                    distractors = _leftover_distractors(x, items, a, counts, rng)
                    if not slots:
                        slots = list(range(N_CHOICES))
                        slot_rng.shuffle(slots)
                    pos = slots.pop()
                    made[(id(x.concept), a.name, t)] = (distractors[:pos] + [x.value.text] + distractors[pos:], pos)
    out: List[probes.Question] = []
    tids: List[str] = []
    seen_q: Dict[str, str] = {}
    for c in concepts:
        n_before = len(out)
        fields = {n: v.text for n, v in c.values.items() if v is not None}
        for attr in SCHEMA[c.category]:
            v = c.values[attr.name]
            if v is None or (id(c), attr.name, 0) not in made:
                continue
            seen_k = {normalize_answer(v.text)}
            aliases = []
            for s in v.aliases + v.also:
                k = normalize_answer(s)
                if k and k not in seen_k:
                    seen_k.add(k)
                    aliases.append(s)
            for t, template in enumerate(attr.templates):
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
                choices, pos = made[(id(c), attr.name, t)]
                q = probes.Question(concept=c.name, category=c.category, question=text, choices=tuple(choices),
                                    answer=pos, tier=c.tier, aliases=tuple(aliases), facts=c.facts)
                check_question(c, attr, q)
                out.append(q)
                tids.append(template_id(c.category, attr.name, t))
        if len(out) - n_before < MIN_QUESTIONS_PER_CONCEPT:
            skipped = [f"{cat}.{a}: {why}" for (cat, a), why in plan.dropped.items() if cat == c.category]
            skipped += [f"{a} (answer shares a word stem with the name)"
                        for (cat, a), cs in plan.stem_skipped.items() if c in cs]
            raise BuildError(f"{c.where()}: {len(out) - n_before} question(s); at least "
                             f"{MIN_QUESTIONS_PER_CONCEPT} are needed (not asked: {'; '.join(skipped) or 'balancing'})")
    return Build(out, tids, plan, outside)


# --------------------------------------------------------------------------- cheap guessers


def guesser_accuracy(questions: Sequence["probes.Question"], templates: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per template: ``n`` and the expected accuracy of the guessers that never read the
    question (see the module docstring): ``count``, ``rate``, ``all`` (prior-only) and
    ``stem`` (stem-overlap). Ties get fractional credit."""
    by_t: Dict[str, List["probes.Question"]] = defaultdict(list)
    for q, t in zip(questions, templates):
        by_t[t].append(q)
    out: Dict[str, Dict[str, float]] = {}
    for t, qs in by_t.items():
        correct = Counter(normalize_answer(q.choices[q.answer]) for q in qs)
        offered = Counter(normalize_answer(c) for q in qs for c in q.choices)
        acc = Counter()
        for q in qs:
            keys = [normalize_answer(c) for c in q.choices]
            a = keys[q.answer]
            loo = [correct[k] - (k == a) for k in keys]
            scores = {
                "count": loo,
                "rate": [n / (offered[k] - 1) if offered[k] > 1 else CHANCE for n, k in zip(loo, keys)],
                "all": [correct[k] for k in keys],
            }
            for name, s in scores.items():
                best = [i for i, x in enumerate(s) if x == max(s)]
                acc[name] += (q.answer in best) / len(best)
            stems = word_stems(q.concept, STEM_LEN)
            sharing = [i for i, c in enumerate(q.choices) if word_stems(c, STEM_LEN) & stems]
            acc["stem"] += (q.answer in sharing) / len(sharing) if sharing else CHANCE
        out[t] = {"n": len(qs), **{k: acc[k] / len(qs) for k in ("count", "rate", "all", "stem")}}
    return out


GUESSER_BOUNDS = {  # (min, max) accuracy of each guesser, per template
    "count": (0.0, CHANCE + GUESSER_MARGIN),
    "rate": (0.0, CHANCE + GUESSER_MARGIN),
    "all": (CHANCE - GUESSER_MARGIN, CHANCE + GUESSER_MARGIN),
    "stem": (CHANCE - GUESSER_MARGIN, CHANCE + GUESSER_MARGIN),
}


def check_guessers(acc: Dict[str, Dict[str, float]], templates: Dict[str, str]) -> None:
    for t, row in acc.items():
        for name, (lo, hi) in GUESSER_BOUNDS.items():
            if not lo - 1e-9 <= row[name] <= hi + 1e-9:
                raise BuildError(f"{templates[t]}: template {t}: the '{name}' guesser scores {row[name]:.1%} "
                                 f"on {row['n']} questions, outside [{lo:.0%}, {hi:.0%}]")


def guesser_table(acc: Dict[str, Dict[str, float]], outside: Dict[str, int]) -> str:
    """One row per template, in SCHEMA order (the printout docs/world-probe.md shows):
    questions, those outside a block, and the guessers' accuracy in %."""
    order = [template_id(cat, a.name, i) for cat, attrs in SCHEMA.items() for a in attrs
             for i in range(len(a.templates))]
    lines = ["template                 questions  outside  prior:count  prior:rate  prior:all   stem"]
    for t in sorted(acc, key=lambda t: order.index(t) if t in order else len(order)):
        row = acc[t]
        lines.append(f"{t:<24} {row['n']:>9}  {outside[t]:>7}  " + "  ".join(
            f"{100 * row[k]:>{w}.1f}" for k, w in (("count", 11), ("rate", 10), ("all", 9), ("stem", 5))))
    return "\n".join(lines)


def plan_notes(plan: Plan) -> str:
    lines = []
    for (cat, a), why in plan.dropped.items():
        lines.append(f"not asked: {cat}.{a}: {why}")
    for (cat, a), capped in plan.capped.items():
        lines.append(f"balanced: {cat}.{a}: asked for " + ", ".join(
            f"{k} of the {n} concepts answering {v!r}" for v, (k, n) in capped.items()))
    for (cat, a), cs in plan.stem_skipped.items():
        if (cat, a) not in plan.dropped:
            lines.append(f"answer shares a word stem with the name, not asked: {cat}.{a}: "
                         + ", ".join(c.name for c in cs))
    return "\n".join(lines)


def summarize(probe: "probes.ProbeSet") -> str:
    cats = probe.categories
    tiers = [t for t in TIERS if t in set(probe.concept_tier)]
    counts = Counter(zip(probe.concept_category, probe.concept_tier))
    q_per_cat = Counter(q.category for q in probe.questions)
    q_per_concept = Counter(q.concept for q in probe.questions)
    width = max(len(c) for c in cats + ["category", "total"])
    lines = [f"{'category':<{width}}  " + "  ".join(f"{t:>6}" for t in tiers)
             + "  concepts  questions  per concept"]
    for k, cat in enumerate(cats):
        row = [counts[(k, t)] for t in tiers]
        per = [q_per_concept[c] for c, ck in zip(probe.concepts, probe.concept_category) if ck == k]
        lines.append(f"{cat:<{width}}  " + "  ".join(f"{n:>6}" for n in row)
                     + f"  {sum(row):>8}  {q_per_cat[cat]:>9}  {min(per):>5}-{max(per):<5}")
    tot = [sum(counts[(k, t)] for k in range(len(cats))) for t in tiers]
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{n:>6}" for n in tot)
                 + f"  {len(probe.concepts):>8}  {len(probe.questions):>9}")
    hist = Counter(q.answer for q in probe.questions)
    n = len(probe.questions)
    lines.append("answer positions: " + ", ".join(f"{i}: {hist[i]} ({100 * hist[i] / n:.1f}%)"
                                                  for i in range(N_CHOICES)))
    return "\n".join(lines)


def build(data_dir: Path = DEFAULT_DATA_DIR, output: Path = DEFAULT_OUTPUT,
          seed: int = SEED) -> Tuple["probes.ProbeSet", Build, Dict[str, Dict[str, float]]]:
    concepts = read_tables(Path(data_dir))
    built = build_questions(concepts, seed=seed)
    acc = guesser_accuracy(built.questions, built.templates)
    tables = {template_id(cat, a.name, i): f"{cat}.csv" for cat, attrs in SCHEMA.items()
              for a in attrs for i in range(len(a.templates))}
    check_guessers(acc, tables)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    probes.write_jsonl(built.questions, output)
    probe = probes.ProbeSet("world", probes.read_jsonl(output))
    probes.check_probe(probe, min_concepts=MIN_CONCEPTS)
    if len(probe.questions) != len(built.questions) or len(probe.concepts) != len(concepts):
        raise BuildError(f"{output}: re-read {len(probe.questions)} questions / {len(probe.concepts)} concepts, "
                         f"wrote {len(built.questions)} / {len(concepts)}")
    return probe, built, acc


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of <category>.csv tables")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSONL file to write")
    ap.add_argument("-q", "--quiet", action="store_true", help="no summary")
    args = ap.parse_args(argv)
    try:
        probe, built, acc = build(args.data_dir, args.output)
    except (BuildError, probes.ProbeError) as e:
        print(f"build_world_probe: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {args.output}")
        print(summarize(probe))
        print(plan_notes(built.plan))
        print(f"cheap guessers, accuracy (%) per template (chance {100 * CHANCE:.0f}%; "
              f"bounds: prior:count, prior:rate <= {100 * (CHANCE + GUESSER_MARGIN):.0f}; "
              f"prior:all, stem {100 * (CHANCE - GUESSER_MARGIN):.0f}..{100 * (CHANCE + GUESSER_MARGIN):.0f}):")
        print(guesser_table(acc, built.outside))
    return 0


if __name__ == "__main__":
    sys.exit(main())
