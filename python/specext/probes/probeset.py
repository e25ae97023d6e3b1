"""Knowledge probes: questions grouped by concept, concepts grouped by category.

A probe file is JSONL, one question a line::

    {"concept": "Marie Curie", "category": "person", "question": "In which field did Marie Curie win her first Nobel Prize?",
     "choices": ["Physics", "Chemistry", "Medicine", "Literature"], "answer": 0,
     "tier": "high", "aliases": ["physics"], "facts": ["Marie Curie won the 1903 Nobel Prize in Physics."]}

``concept``, ``category``, ``question``, ``choices`` (>= 2 distinct strings) and ``answer``
(0-based index into ``choices``) are required; ``tier`` (frequency tier: ``high``,
``medium``, ``low`` or any label), ``aliases`` (accepted open-ended answers besides the
correct choice) and ``facts`` (training sentences for fine-tuning) are optional. Errors
name the file and line. The file is UTF-8 (a leading byte-order mark is accepted); another
encoding is an error naming the file and line.

Built-in sets (shipped in ``specext/data``): ``world`` (real-world knowledge for real
LLMs) and ``synthetic`` (the fictional world the demo model was trained on).
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BUILTIN = {"world": DATA_DIR / "world.jsonl", "synthetic": DATA_DIR / "synthetic.jsonl"}

# lm-evaluation-harness style: the continuation is " " + choice after "Answer:".
MCQ_TEMPLATE = "Question: {question}\nAnswer:"
OPEN_TEMPLATE = "Question: {question}\nAnswer:"

_REQUIRED = ("concept", "category", "question", "choices", "answer")
_OPTIONAL = ("tier", "aliases", "facts")


class ProbeError(ValueError):
    """A malformed probe file; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Question:
    concept: str
    category: str
    question: str
    choices: Tuple[str, ...]
    answer: int
    tier: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    facts: Tuple[str, ...] = ()
    source: str = ""  # "file:line"

    @property
    def correct(self) -> str:
        return self.choices[self.answer]

    def mcq_prompt(self, template: str = MCQ_TEMPLATE) -> str:
        return template.format(question=self.question)

    def open_prompt(self, template: str = OPEN_TEMPLATE) -> str:
        return template.format(question=self.question)

    def accepted_answers(self) -> Tuple[str, ...]:
        """Open-ended answers that count as correct: the correct choice and the aliases."""
        seen, out = set(), []
        for a in (self.correct,) + self.aliases:
            k = normalize_answer(a)
            if k and k not in seen:
                seen.add(k)
                out.append(a)
        return tuple(out)


@dataclass
class ProbeSet:
    """Questions with dense concept and category indices (in order of first appearance)."""

    name: str
    questions: List[Question]
    concepts: List[str] = field(default_factory=list)
    categories: List[str] = field(default_factory=list)
    concept_category: List[int] = field(default_factory=list)  # category index of each concept
    concept_tier: List[Optional[str]] = field(default_factory=list)

    def __post_init__(self):
        if not self.concepts:
            self._index()

    def _index(self):
        cidx: Dict[str, int] = {}
        kidx: Dict[str, int] = {}
        self.concepts, self.categories, self.concept_category, self.concept_tier = [], [], [], []
        for q in self.questions:
            if q.category not in kidx:
                kidx[q.category] = len(self.categories)
                self.categories.append(q.category)
            if q.concept not in cidx:
                cidx[q.concept] = len(self.concepts)
                self.concepts.append(q.concept)
                self.concept_category.append(kidx[q.category])
                self.concept_tier.append(q.tier)
        self._cidx, self._kidx = cidx, kidx

    def concept_index(self, q: Question) -> int:
        return self._cidx[q.concept]

    def category_index(self, q: Question) -> int:
        return self._kidx[q.category]

    @property
    def tiers(self) -> List[str]:
        return sorted({t for t in self.concept_tier if t is not None})

    def subset_concepts(self, keep: Sequence[str], name: Optional[str] = None) -> "ProbeSet":
        keep_set = set(keep)
        return ProbeSet(name or self.name, [q for q in self.questions if q.concept in keep_set])

    def __len__(self) -> int:
        return len(self.questions)


def normalize_answer(s: str) -> str:
    """Casefold, strip accents, punctuation, articles and extra spaces (SQuAD-style)."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch)).casefold()
    s = re.sub(r"[^\w\s]", " ", s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _err(src: str, msg: str) -> ProbeError:
    return ProbeError(f"{src}: {msg}")


def _str_list(obj, key: str, src: str) -> Tuple[str, ...]:
    if obj is None:
        return ()
    if isinstance(obj, str):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(x, str) and x.strip() for x in obj):
        raise _err(src, f"'{key}' must be a list of non-empty strings, got {obj!r}")
    return tuple(x.strip() for x in obj)


def parse_question(obj, src: str) -> Question:
    """Validate one decoded JSON object; ``src`` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise _err(src, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise _err(src, f"missing required field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        logger.debug("%s: ignoring unknown field(s) %s", src, unknown)
    for k in ("concept", "category", "question"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise _err(src, f"'{k}' must be a non-empty string, got {obj[k]!r}")
    choices = obj["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise _err(src, f"'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    choices = [c.strip() for c in choices]
    seen_choice: Dict[str, str] = {}
    for c in choices:
        k = normalize_answer(c)
        if k in seen_choice:
            raise _err(src, f"'choices' must be distinct, but {seen_choice[k]!r} and {c!r} are the same answer "
                            f"after normalisation (case, accents, punctuation, articles): {choices!r}")
        seen_choice[k] = c
    ans = obj["answer"]
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise _err(src, f"'answer' must be an integer index in [0, {len(choices) - 1}], got {ans!r}")
    tier = obj.get("tier")
    if tier is not None and not isinstance(tier, (str, int)):
        raise _err(src, f"'tier' must be a string, got {tier!r}")
    return Question(
        concept=obj["concept"].strip(),
        category=obj["category"].strip(),
        question=obj["question"].strip(),
        choices=tuple(choices),
        answer=ans,
        tier=None if tier is None else str(tier),
        aliases=_str_list(obj.get("aliases"), "aliases", src),
        facts=_str_list(obj.get("facts"), "facts", src),
        source=src,
    )


def _decode_lines(path: Path) -> Iterable[Tuple[int, str]]:
    """The file's lines as UTF-8 text (a leading UTF-8 byte-order mark is dropped); a line
    that is not UTF-8 is an error naming the file and line (and the likely encoding)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ProbeError(f"{path}:1: the file is UTF-16 (byte-order mark {data[:2].hex()}); probe files must be "
                         f"UTF-8 (optionally with a BOM): re-save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if b"\x00" in raw:  # valid UTF-8, but never in a JSONL probe: UTF-16/32 without a BOM
            raise ProbeError(f"{path}:{lineno}: NUL bytes (UTF-16 or UTF-32 without a byte-order mark?); "
                             f"probe files must be UTF-8 (optionally with a BOM): re-save it as UTF-8")
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProbeError(f"{path}:{lineno}: not valid UTF-8 at byte {e.start} of the line "
                             f"({raw[e.start:e.start + 4]!r}; Latin-1 or cp1252?); probe files must be UTF-8 "
                             f"(optionally with a BOM): re-save it as UTF-8") from None


def read_jsonl(path: Union[str, os.PathLike]) -> List[Question]:
    path = Path(path)
    if path.is_dir():
        raise ProbeError(f"probe {str(path)!r} is a directory; give a JSONL file (one question a line) "
                         f"or a built-in set ({', '.join(BUILTIN)})")
    if not path.is_file():
        raise FileNotFoundError(f"probe file {path} does not exist")
    out: List[Question] = []
    for lineno, line in _decode_lines(path):
        if not line.strip():
            continue
        src = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _err(src, f"invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(parse_question(obj, src))
    return out


def check_probe(probe: ProbeSet, *, min_concepts: int = 1) -> None:
    """Set-level checks: non-empty, enough concepts, each category non-empty, a concept in
    one category only, no duplicate question for a concept."""
    if not probe.questions:
        raise ProbeError(f"probe '{probe.name}' has no questions")
    if len(probe.concepts) < min_concepts:
        raise ProbeError(f"probe '{probe.name}' has {len(probe.concepts)} concept(s); at least {min_concepts} needed")
    seen_cat: Dict[str, Tuple[str, str]] = {}
    seen_q: Dict[Tuple[str, str], str] = {}
    for q in probe.questions:
        prev = seen_cat.setdefault(q.concept, (q.category, q.source))
        if prev[0] != q.category:
            raise ProbeError(f"{q.source}: concept {q.concept!r} has category {q.category!r} "
                             f"but {prev[1]} gives {prev[0]!r}")
        key = (q.concept, normalize_answer(q.question))
        if key in seen_q:
            raise ProbeError(f"{q.source}: duplicate question for concept {q.concept!r} (first at {seen_q[key]})")
        seen_q[key] = q.source


def load_probe(spec: Union[str, os.PathLike], *, max_concepts: Optional[int] = None, seed: int = 0) -> ProbeSet:
    """Load a built-in probe set (``"world"``, ``"synthetic"``) or a JSONL file.

    ``max_concepts`` keeps a seeded sample of that many concepts, stratified so that
    every category keeps at least one concept when possible.
    """
    spec_s = str(spec)
    if spec_s in BUILTIN:
        path, name = BUILTIN[spec_s], spec_s
        if not path.is_file():
            raise FileNotFoundError(f"built-in probe '{spec_s}' is missing from the package ({path})")
    else:
        path, name = Path(spec_s), Path(spec_s).stem
        if not path.exists():
            raise FileNotFoundError(f"probe {spec_s!r} is neither a built-in set ({', '.join(BUILTIN)}) nor an existing file")
    probe = ProbeSet(name, read_jsonl(path))
    check_probe(probe)
    if max_concepts is not None:
        probe = sample_concepts(probe, max_concepts, seed=seed)
    logger.info("probe %s: %d questions, %d concepts, %d categories", name, len(probe), len(probe.concepts),
                len(probe.categories))
    return probe


def stratified_sample(items: Sequence, categories: Sequence, n: int, seed: int = 0) -> List:
    """A seeded sample of ``n`` of ``items`` (``categories[i]`` is item i's category),
    round-robin over the categories in sorted order so that every category is represented
    as evenly as it can be; returned in input order. ``n >= len(items)`` returns them all.
    The one sampler of the package: ``--max-concepts`` and ``--pss-concepts`` both use it."""
    import random

    if n < 1:
        raise ValueError(f"a sample needs n >= 1, got {n}")
    if len(items) != len(categories):
        raise ValueError(f"items and categories differ in length ({len(items)} vs {len(categories)})")
    if n >= len(items):
        return list(items)
    rng = random.Random(seed)
    per_cat: Dict[object, List[int]] = {}
    for i, c in enumerate(categories):
        per_cat.setdefault(c, []).append(i)
    for lst in per_cat.values():
        rng.shuffle(lst)
    chosen: List[int] = []
    while len(chosen) < n:
        for c in sorted(per_cat):
            if per_cat[c] and len(chosen) < n:
                chosen.append(per_cat[c].pop())
    return [items[i] for i in sorted(chosen)]


def sample_concepts(probe: ProbeSet, n: int, *, seed: int = 0) -> ProbeSet:
    """The probe restricted to a seeded, category-stratified sample of ``n`` concepts
    (:func:`stratified_sample`), in original order."""
    if n < 1:
        raise ValueError(f"max_concepts must be >= 1, got {n}")
    return probe.subset_concepts(stratified_sample(probe.concepts, probe.concept_category, n, seed))


def write_jsonl(questions: Iterable[Question], path: Union[str, os.PathLike]) -> None:
    """Write questions as JSONL (atomically: a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for q in questions:
            obj = {"concept": q.concept, "category": q.category, "question": q.question,
                   "choices": list(q.choices), "answer": q.answer}
            if q.tier is not None:
                obj["tier"] = q.tier
            if q.aliases:
                obj["aliases"] = list(q.aliases)
            if q.facts:
                obj["facts"] = list(q.facts)
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
