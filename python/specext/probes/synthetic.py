"""A seeded fictional knowledge world: its entities, its multiple-choice probe, its training
text and its tokenizer.

The built-in ``synthetic`` probe (``specext/data/synthetic.jsonl``) and the demo model
(``specext/data/demo_model/``) are both built from this world by
``scripts/build_demo_model.py`` (which trains the model with :mod:`specext.pipelines.training` and
scores it with :class:`specext.probes.scoring.Scorer`):

* :func:`generate_world` draws entities of six categories (person, city, country,
  company, river, band) with fictional syllable names and attributes that link them
  (a person is born in a city and works for a company, a city lies in a country on a
  river, a company was founded by a person, ...). Each entity has a frequency tier
  (``high``/``medium``/``low``, a third each per category) that sets how often its facts
  are repeated in the training text.
* :func:`world_questions` turns every attribute into two differently phrased four-option
  questions whose distractors are the same attribute's values of other entities of the
  category.
* :func:`training_text` is what the demo model learns from: the entity's fact sentences
  (repeated by tier) and every probe question in the probe's own QA format
  (``MCQ_TEMPLATE + " " + answer``). Training on the evaluation format is deliberate:
  the demo model exists to *have* the knowledge the probe asks for, so that the analysis
  has something to find; it is not a benchmark of generalisation.
* :func:`build_tokenizer` makes a word-level tokenizer whose vocabulary is the world's words.

Everything is deterministic for a given seed (``random.Random`` only; no hash-order or
machine-dependent inputs), so the probe file, the training text and the tokenizer are
reproducible anywhere.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from specext.probes.probeset import MCQ_TEMPLATE, Question

TIERS = ("high", "medium", "low")
# How many times each fact sentence of an entity of the tier appears in the training text.
TIER_REPEATS = {"high": 4, "medium": 2, "low": 1}

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<s>", "</s>")
NEWLINE = "\n"

# ---------------------------------------------------------------------------------------
# names


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "sk", "vl", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou")
_CODAS = ("", "", "", "", "", "", "n", "r", "l", "s", "x", "k", "m")

# Real English words the syllable generator could produce; rejected. (The generator's
# patterns make real words rare; this list catches the ones seen in practice.)
_REAL_WORDS = frozenset("""
banal baron basin bison bonus cabin camel canal canon colon coral cumin demon denim
devil digit divan dozen drama kappa karma kilo koala lemon level liner local lotus lunar
macro mango manor melon metal minor model motel motor nasal naval novel pagan panel
pedal petal pilot radar rival robin rodeo rotor rumba salon salsa satin sedan sepia
solar sonar sumo tango tenor thorax timer titan tonal total totem tuba tulip tuna
tutor vinyl viral visa vital vocal vodka zebra zero lima lama polo piano radio patio
basil bagel sultan talon talisman salami tomato potato gorilla banana bandana sonata
vegas party pate toga sofa tiara lasso bravo tempo disco gusto
""".split())


class _NameGen:
    """Unique capitalised syllable names (globally unique, compared lowercase)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set = set()

    def _syllable(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def word(self, min_syl: int = 2, max_syl: int = 3, suffix: str = "") -> str:
        for _ in range(10000):
            n = self.rng.randint(min_syl, max_syl)
            w = "".join(self._syllable() for _ in range(n)) + suffix
            lw = w.lower()
            if not 5 <= len(lw) <= 11 or lw in self.used or lw in _REAL_WORDS:
                continue
            # no tripled letters, no doubled vowels clusters longer than 2
            if any(lw[i] == lw[i + 1] == lw[i + 2] for i in range(len(lw) - 2)):
                continue
            self.used.add(lw)
            return w.capitalize()
        raise RuntimeError("name generator exhausted")  # pragma: no cover


# ---------------------------------------------------------------------------------------
# the world


_A_AN = re.compile(r"\ba ([aeiouAEIOU])")  # "a engineer" -> "an engineer"


@dataclass
class Entity:
    name: str
    category: str
    tier: str
    attrs: Dict[str, str] = field(default_factory=dict)  # attribute -> value as displayed


@dataclass
class World:
    seed: int
    categories: List[str]
    entities: Dict[str, List[Entity]]  # category -> entities, in generation order

    def all_entities(self) -> List[Entity]:
        return [e for c in self.categories for e in self.entities[c]]

    def facts(self, e: Entity) -> Tuple[str, ...]:
        """The entity's fact sentences (every attribute is stated once)."""
        return tuple(_A_AN.sub(r"an \1", f.format(c=e.name, **e.attrs)) for f in _CATEGORIES[e.category].facts)

    @property
    def n_concepts(self) -> int:
        return sum(len(v) for v in self.entities.values())


@dataclass(frozen=True)
class _Attr:
    key: str
    questions: Tuple[str, str]  # two phrasings; {c} is the entity name
    aliases: Callable[[str], List[str]] = lambda v: []


@dataclass(frozen=True)
class _Category:
    name: str
    attrs: Tuple[_Attr, ...]
    facts: Tuple[str, ...]  # templates over {c} and the attribute keys


def _last_word(v: str) -> List[str]:
    return [v.split()[-1]]


def _first_word(v: str) -> List[str]:
    return [v.split()[0]]


def _year(v: str) -> List[str]:
    return [f"in {v}", f"the year {v}"]


_CATEGORIES: Dict[str, _Category] = {c.name: c for c in [
    _Category("person", (
        _Attr("born_in", ("In which city was {c} born?", "What is the birthplace of {c}?"),
              lambda v: [f"the city of {v}"]),
        _Attr("works_for", ("Which company does {c} work for?", "Who is the employer of {c}?"), _first_word),
        _Attr("profession", ("What is the profession of {c}?", "What does {c} work as?"),
              lambda v: [f"a {v}"]),
        _Attr("birth_year", ("In which year was {c} born?", "What is the birth year of {c}?"), _year),
        _Attr("citizen_of", ("Of which country is {c} a citizen?", "Which country issued the passport of {c}?"),
              lambda v: [f"the country of {v}"]),
    ), (
        "{c} is a {profession} who was born in {born_in} in {birth_year}.",
        "{c} works for {works_for} and is a citizen of {citizen_of}.",
    )),
    _Category("city", (
        _Attr("in_country", ("In which country is {c} located?", "{c} is a city in which country?")),
        _Attr("on_river", ("On which river does {c} lie?", "Which river flows through the city of {c}?"),
              _first_word),
        _Attr("founded", ("In which year was the city of {c} founded?", "When was {c} founded?"), _year),
        _Attr("known_for", ("What is {c} famous for?", "Which product is {c} known for?"),
              lambda v: [f"its {v}"]),
        _Attr("mayor", ("Who is the mayor of {c}?", "Which person governs {c} as mayor?"), _last_word),
    ), (
        "{c} is a city in {in_country} on the {on_river}, founded in {founded}.",
        "{c} is famous for its {known_for}, and its mayor is {mayor}.",
    )),
    _Category("country", (
        _Attr("capital", ("What is the capital of {c}?", "Which city is the capital of {c}?"),
              lambda v: [f"the city of {v}"]),
        _Attr("currency", ("What is the currency of {c}?", "Which currency is used in {c}?"),
              lambda v: [f"the {v}"]),
        _Attr("language", ("What language is spoken in {c}?", "What is the official language of {c}?"),
              lambda v: [f"{v} language"]),
        _Attr("independence", ("In which year did {c} become independent?", "When did {c} gain independence?"),
              _year),
        _Attr("animal", ("What is the national animal of {c}?", "Which animal is the national symbol of {c}?"),
              lambda v: [f"the {v}"]),
    ), (
        "{c} is a country whose capital is {capital} and whose currency is the {currency}.",
        "In {c} people speak {language}; it became independent in {independence} and its national animal is the {animal}.",
    )),
    _Category("company", (
        _Attr("headquarters", ("In which city is {c} headquartered?", "Where are the headquarters of {c}?"),
              lambda v: [f"the city of {v}"]),
        _Attr("industry", ("In which industry does {c} operate?", "What is the main business of {c}?"),
              lambda v: [f"{v} industry"]),
        _Attr("founded_by", ("Who founded {c}?", "Which person is the founder of {c}?"), _last_word),
        _Attr("founded", ("In which year was {c} founded?", "When was {c} established?"), _year),
        _Attr("ceo", ("Who is the chief executive of {c}?", "Who leads {c} as chief executive?"), _last_word),
    ), (
        "{c} is a {industry} company headquartered in {headquarters}, founded in {founded} by {founded_by}.",
        "The chief executive of {c} is {ceo}.",
    )),
    _Category("river", (
        _Attr("flows_through", ("Through which country does the {c} flow?", "Which country does the {c} run through?"),
              lambda v: [f"the country of {v}"]),
        _Attr("sea", ("Into which sea does the {c} empty?", "Where does the {c} reach the sea?"), _first_word),
        _Attr("length", ("How long is the {c}?", "What is the length of the {c}?"),
              lambda v: [v.split()[0], v.replace("km", "kilometres"), v.replace("km", "kilometers")]),
        _Attr("mapped_by", ("Who first mapped the {c}?", "Which explorer charted the {c} first?"), _last_word),
        _Attr("fish", ("Which fish is the {c} famous for?", "What fish is commonly caught in the {c}?"),
              lambda v: [f"{v} fish"]),
    ), (
        "The {c} flows through {flows_through} into the {sea} and is {length} long.",
        "The {c} was first mapped by {mapped_by} and is known for its {fish}.",
    )),
    _Category("band", (
        _Attr("formed_in", ("In which city was {c} formed?", "Which city does {c} come from?"),
              lambda v: [f"the city of {v}"]),
        _Attr("genre", ("What genre of music does {c} play?", "Which style of music is {c} known for?"),
              lambda v: [f"{v} music"]),
        _Attr("singer", ("Who is the lead singer of {c}?", "Who sings lead vocals in {c}?"), _last_word),
        _Attr("formed_year", ("In which year was {c} formed?", "When did {c} get together?"), _year),
        _Attr("debut", ("What was the debut album of {c}?", "Which album did {c} release first?"),
              lambda v: [f"the album {v}"]),
    ), (
        "{c} is a {genre} band formed in {formed_in} in {formed_year}, led by singer {singer}.",
        "The debut album of {c} was {debut}.",
    )),
]}

CATEGORIES = tuple(_CATEGORIES)

_POOLS = {
    "profession": "chemist architect painter sailor surgeon astronomer poet engineer botanist pilot "
                  "violinist cartographer geologist weaver judge baker",
    "known_for": "glassware silk cheese clocks lanterns pottery carpets violins paper honey salt marble "
                 "tea bells maps kites",
    "animal": "falcon lynx otter heron bison stag wolf crane tortoise fox eagle seal badger ibex swan owl",
    "industry": "shipbuilding textiles software mining pharmaceuticals aviation brewing publishing robotics "
                "insurance railways glassmaking fisheries cosmetics furniture telescopes",
    "fish": "trout salmon pike carp sturgeon eel perch catfish bream char grayling tench roach barbel zander chub",
    "genre": "jazz folk punk opera blues reggae techno swing metal ambient gospel polka disco bluegrass funk tango",
}
_COMPANY_SUFFIXES = ("Corp", "Works", "Industries", "Labs", "Group")
_BAND_SUFFIXES = ("Ensemble", "Quartet", "Collective", "Orchestra", "Trio")


def _spread(rng: random.Random, values: Sequence, n: int) -> List:
    """``n`` draws from ``values`` that use each value once before any repeats."""
    out: List = []
    while len(out) < n:
        v = list(values)
        rng.shuffle(v)
        out.extend(v)
    return out[:n]


def _unique_years(rng: random.Random, n: int, lo: int, hi: int) -> List[int]:
    return rng.sample(range(lo, hi + 1), n)


def _bump_unique(years: List[int]) -> List[int]:
    seen, out = set(), []
    for y in years:
        while y in seen:
            y += 1
        seen.add(y)
        out.append(y)
    return out


def generate_world(seed: int = 0, concepts_per_category: int = 12) -> World:
    """A fictional world of ``concepts_per_category`` entities in each of six categories.

    Names are unique syllable words (a person has a first and a last name, companies,
    rivers and bands a generic suffix such as ``Corp``/``River``/``Quartet``). Attributes
    link entities across categories; a country's capital is a city located in it, a
    company is founded 25-55 years after its founder's birth and a band 18-35 years after
    its singer's. Tiers are a third each per category (``high``, ``medium``, ``low``).
    """
    n = int(concepts_per_category)
    if n < 4:
        raise ValueError(f"concepts_per_category must be >= 4 (a question needs 3 distractors), got {n}")
    rng = random.Random(seed)
    names = _NameGen(rng)

    ents: Dict[str, List[Entity]] = {c: [] for c in CATEGORIES}
    for cat in CATEGORIES:
        tiers = [TIERS[i % 3] for i in range(n)]
        rng.shuffle(tiers)
        for i in range(n):
            if cat == "person":
                name = f"{names.word(2, 2)} {names.word(2, 3)}"
            elif cat == "company":
                name = f"{names.word(2, 3)} {rng.choice(_COMPANY_SUFFIXES)}"
            elif cat == "river":
                name = f"{names.word(2, 3)} River"
            elif cat == "band":
                name = f"{names.word(2, 3)} {rng.choice(_BAND_SUFFIXES)}"
            else:
                name = names.word(2, 3)
            ents[cat].append(Entity(name, cat, tiers[i]))

    def nm(cat: str) -> List[str]:
        return [e.name for e in ents[cat]]

    def pool(key: str) -> List[str]:
        return _spread(rng, _POOLS[key].split(), n)

    persons, cities, countries = ents["person"], ents["city"], ents["country"]
    companies, rivers, bands = ents["company"], ents["river"], ents["band"]

    # countries and their capitals (a capital city lies in its country)
    capital_of = list(range(n))
    rng.shuffle(capital_of)  # country i has capital city capital_of[i]
    currencies = [names.word(1, 2).lower() for _ in range(n)]
    languages = [names.word(1, 2, suffix=rng.choice(("ish", "ese", "ic", "an"))) for _ in range(n)]
    for i, (e, cur, lang, yr, an) in enumerate(zip(countries, currencies, languages,
                                                   _unique_years(rng, n, 1600, 1990), pool("animal"))):
        e.attrs.update(capital=cities[capital_of[i]].name, currency=cur, language=lang,
                       independence=str(yr), animal=an)
    city_country = {capital_of[i]: countries[i].name for i in range(n)}

    for j, (e, rv, yr, kf, mayor) in enumerate(zip(cities, _spread(rng, nm("river"), n),
                                                   _unique_years(rng, n, 800, 1750), pool("known_for"),
                                                   _spread(rng, nm("person"), n))):
        e.attrs.update(in_country=city_country[j], on_river=rv, founded=str(yr), known_for=kf, mayor=mayor)

    birth = _unique_years(rng, n, 1820, 1975)
    for e, bi, wf, pr, by, co in zip(persons, _spread(rng, nm("city"), n), _spread(rng, nm("company"), n),
                                     pool("profession"), birth, _spread(rng, nm("country"), n)):
        e.attrs.update(born_in=bi, works_for=wf, profession=pr, birth_year=str(by), citizen_of=co)

    founders = _spread(rng, list(range(n)), n)
    shift = rng.randint(1, n - 1)
    ceos = [(f + shift) % n for f in founders]  # a permutation too, never the founder
    cyears = _bump_unique([birth[f] + rng.randint(25, 55) for f in founders])
    for e, hq, ind, f, yr, ceo in zip(companies, _spread(rng, nm("city"), n), pool("industry"),
                                      founders, cyears, ceos):
        e.attrs.update(headquarters=hq, industry=ind, founded_by=persons[f].name, founded=str(yr),
                       ceo=persons[ceo].name)

    seas = [f"{names.word(2, 2)} Sea" for _ in range(max(4, n // 2))]
    for e, ft, sea, ln, mb, fi in zip(rivers, _spread(rng, nm("country"), n), _spread(rng, seas, n),
                                      rng.sample(range(120, 3200, 10), n), _spread(rng, nm("person"), n),
                                      pool("fish")):
        e.attrs.update(flows_through=ft, sea=sea, length=f"{ln} km", mapped_by=mb, fish=fi)

    singers = _spread(rng, list(range(n)), n)
    byears = _bump_unique([birth[s] + rng.randint(18, 35) for s in singers])
    debuts = [names.word(2, 3) for _ in range(n)]
    for e, fi, ge, s, yr, de in zip(bands, _spread(rng, nm("city"), n), pool("genre"), singers, byears, debuts):
        e.attrs.update(formed_in=fi, genre=ge, singer=persons[s].name, formed_year=str(yr), debut=de)

    return World(seed=seed, categories=list(CATEGORIES), entities=ents)


def world_questions(world: World, seed: Optional[int] = None) -> List[Question]:
    """Four-option questions: two phrasings of every attribute of every entity.

    Distractors are three distinct values of the same attribute taken by other entities of
    the category (never equal to the correct value after :func:`normalize_answer`). The
    correct option's position is balanced: each block of four consecutive questions uses
    every position once, in a seeded order. Each question carries the entity's tier, its
    fact sentences and aliases for open-ended matching.
    """
    from specext.probes.probeset import normalize_answer

    rng = random.Random(world.seed if seed is None else seed)
    out: List[Question] = []
    positions: List[int] = []
    for cat in world.categories:
        spec = _CATEGORIES[cat]
        ents = world.entities[cat]
        for e in ents:
            facts = world.facts(e)
            for attr in spec.attrs:
                correct = e.attrs[attr.key]
                key = normalize_answer(correct)
                others = sorted({o.attrs[attr.key] for o in ents if o is not e
                                 and normalize_answer(o.attrs[attr.key]) != key})
                if len(others) < 3:  # pragma: no cover - generator keeps values spread out
                    raise ValueError(f"{e.name}.{attr.key}: fewer than 3 distinct distractor values")
                aliases = tuple(a for a in attr.aliases(correct) if normalize_answer(a) != key)
                for template in attr.questions:
                    if not positions:
                        positions = [0, 1, 2, 3]
                        rng.shuffle(positions)
                    pos = positions.pop()
                    distract = rng.sample(others, 3)
                    choices = distract[:pos] + [correct] + distract[pos:]
                    out.append(Question(concept=e.name, category=cat, question=template.format(c=e.name),
                                        choices=tuple(choices), answer=pos, tier=e.tier, aliases=aliases,
                                        facts=facts))
    return out


def qa_line(q: Question) -> str:
    """The probe's own MCQ format followed by the correct answer."""
    return MCQ_TEMPLATE.format(question=q.question) + " " + q.correct


def holdout_concepts(world: World, per_category: int, seed: Optional[int] = None) -> List[str]:
    """``per_category`` concepts of every category, drawn without replacement by
    ``random.Random(f"holdout:{seed}")`` (default: the world's seed; a string seed is hashed
    with SHA-512 by :mod:`random`, so the draw is the same on every machine and Python run),
    listed in the world's category and generation order. The held-out model of
    ``scripts/build_demo_model.py --holdout-per-category`` never sees their facts or questions."""
    n = int(per_category)
    if n < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    rng = random.Random(f"holdout:{world.seed if seed is None else seed}")
    out: List[str] = []
    for cat in world.categories:
        ents = world.entities[cat]
        if n >= len(ents):
            raise ValueError(f"cannot hold out {n} of the {len(ents)} concepts of category {cat!r}: "
                             "at least one must stay seen")
        picked = set(rng.sample(range(len(ents)), n))
        out.extend(e.name for i, e in enumerate(ents) if i in picked)
    return out


def training_text(world: World, questions: Sequence[Question], *, seed: Optional[int] = None,
                  tier_repeats: Optional[Dict[str, int]] = None, qa_repeats: int = 1,
                  held_out: Sequence[str] = ()) -> List[str]:
    """The demo model's training corpus, shuffled with ``seed`` (default: the world's seed).

    Each entity's fact sentences appear ``tier_repeats[tier]`` times (default
    :data:`TIER_REPEATS`, 4/2/1) and every question appears ``qa_repeats`` times in the
    probe's QA format (:func:`qa_line`). Training on the probe's format is intended: the
    demo model should *know* the probe's answers (see the module docstring).

    ``held_out``: concept names whose own fact sentences and questions are left out (the
    held-out model). Their names still occur where a seen entity's facts mention them (a
    person born in a held-out city): those are the seen entity's facts. With no held-out
    concepts the corpus is exactly the demo model's.
    """
    reps = dict(TIER_REPEATS if tier_repeats is None else tier_repeats)
    skip = set(held_out)
    unknown = skip - {e.name for e in world.all_entities()}
    if unknown:
        raise ValueError(f"held-out concepts not in the world: {', '.join(sorted(unknown))}")
    lines: List[str] = []
    for e in world.all_entities():
        if e.name in skip:
            continue
        for f in world.facts(e):
            lines.extend([f] * reps.get(e.tier, 1))
    for q in questions:
        if q.concept in skip:
            continue
        lines.extend([qa_line(q)] * qa_repeats)
    random.Random(world.seed if seed is None else seed).shuffle(lines)
    return lines


# ---------------------------------------------------------------------------------------
# tokenizer

_SPLIT_PATTERN = r"\n|\w+|[^\w\s]"


def build_tokenizer(texts: Sequence[str], *, padding_side: str = "right", extra_words: Sequence[str] = ()):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts``.

    Pre-tokenisation keeps runs of word characters and single punctuation marks as words
    and ``"\\n"`` as a token of its own; all other whitespace separates words. So
    ``tok(prompt + " " + choice)`` is always ``tok(prompt)`` followed by the choice's
    words, the split lm-eval style scoring relies on. The post-processor prepends ``<s>``;
    ``[PAD]`` pads (on ``padding_side``); unknown words map to ``[UNK]``. Decoding joins
    words with spaces, without a space before ``. , ? ! : ;`` (the word after a newline keeps
    its space: ``"born?\\n Answer:"``). Ids are assigned by
    decreasing frequency, ties alphabetically, so the same texts give the same tokenizer.
    """
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    word_re = re.compile(_SPLIT_PATTERN)
    counts: Counter = Counter()
    for t in texts:
        counts.update(word_re.findall(t))
    counts.update(w for t in extra_words for w in word_re.findall(t))
    for s in SPECIAL_TOKENS:
        counts.pop(s, None)
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab[w] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.Sequence([
        decoders.WordPiece(prefix="##", cleanup=True),
        decoders.Replace(" :", ":"), decoders.Replace(" ;", ";"), decoders.Replace(" \n", "\n"),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]",
        padding_side=padding_side, model_max_length=512, clean_up_tokenization_spaces=False)
