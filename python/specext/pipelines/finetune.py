"""``python -m specext.finetune MODEL_DIR``: the paper's causal fine-tuning experiment.

Fine-tune only chosen value vectors (columns of the MLP down-projections) on the facts of
chosen concepts and measure what the model then knows and how much it hallucinates:

- **FT-PV**: the top ``k * pv_fraction`` value vectors (default ``k / 8``) by the PSS
  differential score summed over the trained concepts, ``k`` = the number of vectors at the
  ratio of peak PSS (``--ratio`` overrides);
- **FT-CV**: every other value vector (the complement of FT-PV);
- **FT-RV**: as many vectors as FT-PV, uniformly at random (seeded by the run's seed);
- **FT-FV**: every value vector.

Training (:func:`finetune_deltas`): one dense delta ``(d_model, k_l)`` per layer added in
the forward pass (:class:`specext.models.deltas.ColumnDeltas`), so the optimizer's state
grows with the selection; every other weight stays bitwise unchanged; the delta is merged
into the weights at the end and the model saved. Equal steps, learning rate and batch size
for every strategy; causal-LM loss on every token of the trained concepts' ``facts``.

Evaluation (:func:`evaluate`), before (the original model) and after each run: multiple
choice ``acc``/``acc_norm`` and open-ended accuracy on the trained concepts' questions and
on a fixed control set of other concepts' questions (forgetting), the trained concepts'
PSS (the fine-tuned model's own concept mass and masks), and the hallucination measures:
semantic entropy over sampled answers and the LID of the last layer's hidden state at the
answer position (:mod:`specext.metrics.hallucination`, :mod:`specext.probes.sampling`).

Output directory (``--out``)::

    results.csv, results.json, results.html, results.png   the strategy x metric table
    original.json         the original model's evaluation (resume)
    selection.safetensors the summed differential score of every vector (``score``, (L, d_ff))
    STRATEGY/seed-S/      config.json, tokenizer, model.safetensors (the fine-tuned model, which
                          ``specext.analyze`` accepts), selected.safetensors (``selected``: bool
                          (L, d_ff)), delta.safetensors (``index.L``, ``delta.L``), results.json

A single strategy and seed writes the run's files into ``--out`` itself. Every file is
written atomically; a run's ``results.json`` is written last and marks it complete, so
``--resume`` skips finished (strategy, seed) runs of the same inputs (fingerprint) and redoes
the rest; the output directory is locked while a run works in it. ``--out`` follows analyze's
rules (:func:`specext.pipelines.rundir.prepare_out`): empty, or this experiment's run with
``--resume``, or a specext run of either kind cleared with ``--overwrite``; an analyze run, a
finished finetune run or a folder of other files is refused before anything is written.
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin-wait by default (see pipelines/analyze.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
import json
import logging
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from specext import __version__
from specext._deps import require
from specext._options import DefaultsFormatter, at_least, number_list, one_of
from specext.metrics.accuracy import accuracy_by_group
from specext.metrics.pss import RATIOS, UNRELATED, DifferentialScores, MaskedScorer, PSSConfig, compute_pss, n_vectors
from specext.metrics.specialization import ConceptMass
from specext.models.deltas import ColumnDeltas
from specext.models.loading import DEVICE_MAPS, LoadedModel, check_model_dir, load_model, parse_max_memory, value_norms
from specext.pipelines import rundir, training
from specext.pipelines.run import _Runner, accumulate_devices
from specext.probes.probeset import ProbeSet, load_probe, stratified_sample
from specext.probes.scoring import POSITIONS, Scorer

logger = logging.getLogger("specext.finetune")

STRATEGIES = ("fv", "pv", "cv", "rv")
LABELS = {"original": "original", "fv": "FT-FV", "pv": "FT-PV", "cv": "FT-CV", "rv": "FT-RV"}
STATS = ("abs", "contribution")
# The table's columns: (key, label). "trained_*" on the trained concepts' questions, "control_*"
# on the fixed control set of other concepts' questions (forgetting).
METRICS: Tuple[Tuple[str, str], ...] = (
    ("trained_mcq", "trained: mcq acc"),
    ("trained_mcq_norm", "trained: mcq acc_norm"),
    ("trained_open", "trained: open-ended acc"),
    ("trained_se", "trained: semantic entropy (nats)"),
    ("trained_lid", "trained: LID"),
    ("pss_peak", "trained: peak PSS"),
    ("pss_delta_peak", "trained: peak PSS delta"),
    ("control_mcq", "control: mcq acc"),
    ("control_mcq_norm", "control: mcq acc_norm"),
    ("control_open", "control: open-ended acc"),
    ("control_se", "control: semantic entropy (nats)"),
    ("control_lid", "control: LID"),
)
SE_NOTE_MATCH = ("answers clustered by normalised match against the probe's answer and "
                 "aliases, and by exact normalised equality otherwise (no entailment model: pass --nli-model DIR to "
                 "cluster by bidirectional entailment)")
# The fields of a run's record (its results.json; a single run's also holds the experiment's).
RUN_KEYS = ("strategy", "label", "seed", "run_dir", "vectors", "trained_parameters", "optimizer_state_bytes", "train",
            "evaluation", "model_files", "fingerprint", "selection")
# Options that do not change any result: left out of the fingerprint that --resume checks.
_NOT_RESULTS = ("model_dir", "out", "resume", "overwrite", "strategy", "seeds", "report", "save_model", "from_run",
                "threads", "allow_pickle", "allow_run_mismatch")


@dataclass
class FinetuneConfig:
    """Every option of the experiment (the command line's, one to one)."""

    model_dir: str
    concepts: Optional[Tuple[str, ...]] = None  # the trained concepts, by name
    top_concepts: Optional[int] = None  # or this many (by PSS in --from-run, else a stratified sample)
    tier: Optional[str] = None  # --top-concepts from this frequency tier only
    strategy: str = "all"  # fv | pv | cv | rv | all
    probe: str = "world"
    from_run: Optional[str] = None  # an analyze run directory: its concept mass and peak ratio
    ratio: Optional[float] = None  # percent of all L*d_ff vectors; default: the ratio of peak PSS
    pv_fraction: float = 0.125  # FT-PV = the top k * pv_fraction vectors
    seeds: Optional[int] = None  # runs per strategy (default 3 for all, 1 for one strategy)
    seed: int = 0  # the first seed; the control sets and the original model's sampling use it
    out: Optional[str] = None
    resume: bool = False
    overwrite: bool = False  # clear a --out that holds a specext run (never a folder of other files)
    allow_run_mismatch: bool = False  # --from-run of another model or other questions: a warning, not an error
    # training
    lr: float = 1e-3
    steps: int = 50
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    weight_decay: float = 0.0
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    max_memory: Optional[str] = None
    threads: Optional[int] = None
    # evaluation
    control_size: int = 100  # questions of other concepts measuring forgetting
    eval_batch_size: int = 16
    positions: str = "question"  # tokens of the prompt statistic (concept mass)
    stat: str = "abs"
    unrelated: str = "other"
    pss_ratios: Tuple[float, ...] = RATIOS
    pss_control: int = 100
    max_new_tokens: int = 12
    se_samples: int = 10  # sampled answers per question for semantic entropy (0: off)
    se_temperature: float = 1.0
    nli_model: Optional[str] = None
    lid_k: int = 10  # neighbours of the LID estimator (0: off)
    save_model: bool = True
    report: bool = True
    trust_remote_code: bool = False
    allow_pickle: bool = False  # a checkpoint with only pickled *.bin weights (unpickling can run code)

    def __post_init__(self) -> None:
        if self.concepts is not None:
            self.concepts = tuple(self.concepts)
        self.pss_ratios = tuple(float(r) for r in self.pss_ratios)
        self.validate()

    def validate(self) -> None:
        one_of("--strategy", self.strategy, STRATEGIES + ("all",))
        if self.resume and self.overwrite:
            raise ValueError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
        if self.allow_run_mismatch and self.from_run is None:
            raise ValueError("--allow-run-mismatch applies to --from-run RUN_DIR, which was not given")
        if (self.concepts is None) == (self.top_concepts is None):
            raise ValueError("give the trained concepts with --concepts A,B,... or --top-concepts N (one of them)")
        if self.concepts is not None:
            if not self.concepts or any(not isinstance(c, str) or not c.strip() for c in self.concepts):
                raise ValueError(f"--concepts needs non-empty concept names, got {list(self.concepts)!r}")
            dup = sorted({c for c in self.concepts if self.concepts.count(c) > 1})
            if dup:
                raise ValueError(f"--concepts: {', '.join(dup)} given more than once")
        if self.tier is not None and self.top_concepts is None:
            raise ValueError("--tier selects among --top-concepts; with --concepts name the concepts themselves")
        at_least("--top-concepts", self.top_concepts, 1, optional=True)
        if self.ratio is not None and not (0 < self.ratio <= 100):
            raise ValueError(f"--ratio is a percentage of all value vectors in (0, 100], got {self.ratio}")
        if not (0 < self.pv_fraction <= 1):
            raise ValueError(f"--pv-fraction must be in (0, 1], got {self.pv_fraction}")
        at_least("--seeds", self.seeds, 1, optional=True)
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        at_least("--steps", self.steps, 1)
        at_least("--batch-size", self.batch_size, 1)
        at_least("--grad-accum", self.grad_accum, 1)
        at_least("--warmup", self.warmup, 0)
        at_least("--weight-decay", self.weight_decay, 0.0)
        if self.dtype != "auto":
            one_of("--dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.device_map is not None:
            one_of("--device-map", self.device_map, DEVICE_MAPS)
            parse_max_memory(self.max_memory)
        elif self.max_memory is not None:
            raise ValueError("--max-memory needs --device-map (auto, balanced or sequential)")
        at_least("--threads", self.threads, 1, optional=True)
        at_least("--control-size", self.control_size, 1)
        at_least("--eval-batch-size", self.eval_batch_size, 1)
        one_of("--positions", self.positions, POSITIONS)
        one_of("--stat", self.stat, STATS)
        one_of("--unrelated", self.unrelated, UNRELATED)
        PSSConfig(ratios=self.pss_ratios, control_size=self.pss_control)  # the PSS options' own checks
        at_least("--max-new-tokens", self.max_new_tokens, 1)
        at_least("--se-samples", self.se_samples, 2, off=0)
        if not self.se_temperature > 0:
            raise ValueError(f"--se-temperature must be > 0, got {self.se_temperature}")
        at_least("--lid-k", self.lid_k, 2, off=0)
        if self.nli_model is not None and not Path(self.nli_model).is_dir():
            raise ValueError(f"--nli-model {self.nli_model} is not a directory")

    @property
    def strategies(self) -> List[str]:
        return list(STRATEGIES) if self.strategy == "all" else [self.strategy]

    @property
    def seed_list(self) -> List[int]:
        n = self.seeds if self.seeds is not None else (3 if self.strategy == "all" else 1)
        return [self.seed + i for i in range(n)]

    def train_config(self, seed: int) -> training.TrainConfig:
        # dropout off: only the deltas train, the model is frozen in eval mode, so the result does
        # not depend on how a step is split into micro-batches (--grad-accum)
        return training.TrainConfig(dropout=False, steps=self.steps, batch_size=self.batch_size, accumulation=self.grad_accum,
                                    lr=self.lr, warmup=self.warmup, weight_decay=self.weight_decay, seed=seed,
                                    threads=self.threads, log_every=max(1, self.steps // 5))


# ---------------------------------------------------------------------------------------
# the analyze run (--from-run)


@dataclass
class FromRun:
    """What the experiment reads from an ``analyze`` run directory."""

    path: Path
    concepts: List[str]
    categories: List[str]  # each concept's category
    mass: torch.Tensor  # (K, L, d_ff) float32 concept mass (times value norms for --stat contribution)
    peak_ratio: Optional[float]
    options: Dict[str, object]
    pss_by_concept: Dict[str, float]  # each PSS concept's peak of the headline score
    fingerprint: Dict[str, str]
    # what the run was made on: config.json's fingerprint (model_config_sha256, weights_sha256,
    # probe_sha256) and options (model_dir, probe); {} when config.json records none
    made_on: Dict[str, object] = field(default_factory=dict)


def _uncell(v: str) -> str:
    """Undo :func:`rundir.csv_cell`'s quote before a formula-like cell."""
    return v[1:] if v.startswith("'") and v[1:].startswith(rundir.FORMULA_START) else v


def load_run(run_dir) -> FromRun:
    """Read an ``analyze`` run directory: ``summary.json`` (complete run, peak ratio),
    ``config.json`` (options), ``mass.safetensors`` (concept sums and counts),
    ``concepts.csv`` (each concept's category), ``neurons.safetensors`` (value norms, for
    ``--stat contribution``) and ``pss.csv`` (per-concept PSS). Errors name the file."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--from-run {path} is not a directory")
    summary_p = path / "summary.json"
    if not summary_p.is_file():
        raise ValueError(f"--from-run {path}: incomplete run directory (no summary.json: the analysis failed, was "
                         "killed or is still running)")

    def read_json(name):
        try:
            return json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--from-run: cannot read {path / name}: {e}") from None

    summary, config = read_json("summary.json"), read_json("config.json")
    opts = config.get("options") or {}
    try:
        m = rundir.read_safetensors(path / "mass.safetensors")
        sums, counts = m["concept_sums"], m["concept_counts"]
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"--from-run: cannot read concept_sums/concept_counts from {path / 'mass.safetensors'} "
                         f"({type(e).__name__}: {e})") from None
    if sums.dim() != 3 or tuple(counts.shape) != tuple(sums.shape[:2]):
        raise ValueError(f"--from-run: {path / 'mass.safetensors'}: concept_sums {tuple(sums.shape)} and "
                         f"concept_counts {tuple(counts.shape)} are not (concepts, layers, d_ff) and (concepts, layers)")
    mass = sums / counts[..., None]
    if opts.get("stat") == "contribution":
        try:
            norms = rundir.read_safetensors(path / "neurons.safetensors")["value_norms"]
        except Exception as e:
            raise ValueError(f"--from-run: the run used --stat contribution but {path / 'neurons.safetensors'} has "
                             f"no value_norms ({type(e).__name__}: {e})") from None
        mass = mass * norms[None]
    concepts, cats = [], []
    try:
        with open(path / "concepts.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                concepts.append(_uncell(row["concept"]))
                cats.append(_uncell(row["category"]))
    except (OSError, KeyError) as e:
        raise ValueError(f"--from-run: cannot read concept,category from {path / 'concepts.csv'}: {e}") from None
    if len(concepts) != mass.shape[0]:
        raise ValueError(f"--from-run: {path / 'concepts.csv'} lists {len(concepts)} concepts but "
                         f"{path / 'mass.safetensors'} holds {mass.shape[0]}")
    pss = summary.get("pss") or {}
    score_key = "pss_delta" if pss.get("score") == "delta" else "pss"
    by_concept: Dict[str, float] = {}
    if (path / "pss.csv").is_file():
        with open(path / "pss.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    v = float(row.get(score_key) or "nan")
                except ValueError:
                    continue
                c = _uncell(row["concept"])
                if v == v:
                    by_concept[c] = max(by_concept.get(c, -math.inf), v)
    fp = {"summary_sha256": rundir.sha256_file(summary_p),
          "mass_sha256": rundir.sha256_file(path / "mass.safetensors")}
    rec = config.get("fingerprint") if isinstance(config.get("fingerprint"), dict) else {}
    made_on = {k: rec[k] for k in ("model_config_sha256", "weights_sha256", "probe_sha256") if k in rec}
    if made_on:
        made_on.update(model_dir=opts.get("model_dir"), probe=opts.get("probe"))
    return FromRun(path=path, concepts=concepts, categories=cats, mass=mass, peak_ratio=pss.get("peak_ratio"),
                   options=opts, pss_by_concept=by_concept, fingerprint=fp, made_on=made_on)


def _short(h) -> str:
    return "none (no *.safetensors)" if h is None else str(h)[:12]


def check_from_run(run: FromRun, model_dir, model_fp: Dict[str, object], probe: ProbeSet,
                   trained: Sequence[str]) -> List[str]:
    """What differs between what ``--from-run``'s run was made on and this experiment, one
    sentence each; ``[]`` when nothing does. The model: the run's ``config.json`` records the
    SHA-256 of the model's ``config.json`` (``model_config_sha256``) and of its weights
    (``weights_sha256``), compared with ``MODEL_DIR``'s (``model_fp``: this experiment's
    fingerprint). The probe, where the selection depends on it: unless the two probe files
    hash alike, each trained concept's category (the run's ``concepts.csv``) and question
    texts (the run's ``questions.jsonl``), the prompts its concept mass was accumulated on."""
    cfg_p = run.path / "config.json"
    out: List[str] = []
    made = run.made_on or {}
    if "model_config_sha256" not in made:
        out.append(f"{cfg_p} records no model identity (fingerprint.model_config_sha256 and weights_sha256, which "
                   f"python -m specext.analyze writes), so the run cannot be checked to be of {model_dir}")
    else:
        for key, what in (("model_config_sha256", "the model's config.json"), ("weights_sha256", "the weights")):
            if made.get(key) != model_fp.get(key):
                out.append(f"{key} ({what}) differs: {_short(made.get(key))} in {cfg_p}, {_short(model_fp.get(key))} "
                           f"for MODEL_DIR")
    if made.get("probe_sha256") is not None and made.get("probe_sha256") == model_fp.get("probe_sha256"):
        return out  # the same probe file: the same questions
    cat_of = dict(zip(run.concepts, run.categories))
    for c in trained:
        k = probe.concepts.index(c)
        if c in cat_of and cat_of[c] != probe.categories[probe.concept_category[k]]:
            out.append(f"concept {c!r} is of category {cat_of[c]!r} in {run.path / 'concepts.csv'} but "
                       f"{probe.categories[probe.concept_category[k]]!r} in probe '{probe.name}'")
    q_p = run.path / "questions.jsonl"
    asked: Dict[str, List[str]] = {}
    try:
        with open(q_p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    asked.setdefault(r["concept"], []).append(r["question"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        out.append(f"cannot read the run's questions from {q_p} ({e}) to check that its concept mass comes from "
                   f"probe '{probe.name}''s questions")
        return out
    for c in trained:
        if c not in asked:
            continue  # not among the run's concepts: _run_mass says so
        mine = [q.question for q in probe.questions if q.concept == c]
        if sorted(asked[c]) != sorted(mine):
            theirs, ours = sorted(set(asked[c]) - set(mine)), sorted(set(mine) - set(asked[c]))
            ex = ([f"only in the run: {theirs[0]!r}"] if theirs else []) + ([f"only in the probe: {ours[0]!r}"]
                                                                            if ours else [])
            out.append(f"concept {c!r}: its {len(asked[c])} questions in {q_p} are not probe '{probe.name}''s "
                       f"{len(mine)}" + (f" ({'; '.join(ex)})" if ex else " (repeated questions differ)"))
    return out


# ---------------------------------------------------------------------------------------
# concepts and control set


def choose_concepts(probe: ProbeSet, cfg: FinetuneConfig, run: Optional[FromRun] = None) -> List[str]:
    """The trained concepts: ``--concepts`` (each must be in the probe and have ``facts``), or
    ``--top-concepts N`` of ``--tier``: the N highest by the headline PSS of ``--from-run``'s
    ``pss.csv`` (peak over ratios; concepts without a PSS row after them, in probe order),
    or without a run a seeded sample stratified by category (:func:`stratified_sample`)."""
    with_facts = {q.concept for q in probe.questions if q.facts}
    if cfg.concepts is not None:
        unknown = [c for c in cfg.concepts if c not in probe.concepts]
        if unknown:
            near = [c for c in probe.concepts if any(u.lower() in c.lower() or c.lower() in u.lower() for u in unknown)]
            raise ValueError(f"--concepts: {unknown} not in probe '{probe.name}' ({len(probe.concepts)} concepts"
                             + (f"; similar: {near[:5]}" if near else "") + ")")
        no_facts = [c for c in cfg.concepts if c not in with_facts]
        if no_facts:
            src = next(q.source for q in probe.questions if q.concept == no_facts[0])
            raise ValueError(f"--concepts: {no_facts} have no 'facts' (training text) in probe '{probe.name}' "
                             f"(first question {src})")
        return list(cfg.concepts)
    pool = [k for k, c in enumerate(probe.concepts) if c in with_facts
            and (cfg.tier is None or probe.concept_tier[k] == cfg.tier)]
    if not pool:
        tiers = sorted({t for t in probe.concept_tier if t is not None})
        raise ValueError(f"--top-concepts: no concept of probe '{probe.name}'" + (f" in tier {cfg.tier!r} (tiers: "
                         f"{tiers})" if cfg.tier is not None else "") + " has 'facts' (training text)")
    n = min(cfg.top_concepts, len(pool))
    if n < cfg.top_concepts:
        logger.warning("--top-concepts %d: only %d concepts qualify; training all of them", cfg.top_concepts, n)
    if run is not None and run.pss_by_concept:
        ranked = sorted(pool, key=lambda k: (-run.pss_by_concept.get(probe.concepts[k], -math.inf), k))
        chosen = [probe.concepts[k] for k in ranked[:n]]
        logger.info("--top-concepts %d: highest PSS in %s: %s", n, run.path / "pss.csv", ", ".join(chosen))
        return chosen
    chosen = stratified_sample([probe.concepts[k] for k in pool], [probe.concept_category[k] for k in pool], n,
                               cfg.seed)
    logger.info("--top-concepts %d: no per-concept PSS (no --from-run with pss.csv): a seeded sample stratified by "
                "category: %s", n, ", ".join(chosen))
    return chosen


def control_questions(probe: ProbeSet, trained: Sequence[str], size: int, seed: int) -> List[int]:
    """A fixed, seeded sample of ``size`` question indices of concepts not trained, with at
    least one per category when the size allows (:func:`specext.metrics.pss.control_set` on
    the untrained concepts), in probe order."""
    from specext.metrics.pss import control_set

    keep = set(trained)
    others = [i for i, q in enumerate(probe.questions) if q.concept not in keep]
    if not others:
        raise ValueError(f"no control questions: every concept of probe '{probe.name}' is trained")
    sub = ProbeSet(probe.name, [probe.questions[i] for i in others])
    return [others[i] for i in control_set(sub, size, seed)]


# ---------------------------------------------------------------------------------------
# selection


def vector_scores(mass: torch.Tensor, concept_category: Sequence[int], trained: Sequence[int],
                  unrelated: str = "other", names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``(L, d_ff)`` float64: the PSS differential score of every value vector summed over the
    trained concepts (:class:`specext.metrics.pss.DifferentialScores`, one concept at a time).
    ``names``: every concept's name, for the error about a concept without a usable score."""
    K, L, D = mass.shape
    ds = DifferentialScores(mass, concept_category, unrelated, device=torch.device("cpu"))
    total = torch.zeros(L * D, dtype=torch.float64)
    for k in trained:
        if not ds.valid(k):
            raise ValueError(f"concept {names[k] if names else k!r} has no usable differential score (no usable "
                             f"prompt in the concept mass, or no unrelated concept under --unrelated {unrelated})")
        total += ds(k).cpu()
    return total.view(L, D)


def pv_count(ratio: float, n_layers: int, d_ff: int, fraction: float) -> Tuple[int, int]:
    """``(k, n_pv)``: the vectors ``ratio`` percent selects (as PSS does, globally) and FT-PV's
    share of them, ``max(1, round(k * fraction))``."""
    k = n_vectors(ratio, n_layers, d_ff, "global")
    return k, max(1, int(round(k * fraction)))


def select(strategy: str, scores: torch.Tensor, n_pv: int, seed: int) -> torch.Tensor:
    """``(L, d_ff)`` bool mask of the trained vectors. ``pv``: the ``n_pv`` highest ``scores``
    (ties to the lowest flat index, as a stable sort); ``cv``: the complement of ``pv``;
    ``rv``: ``n_pv`` vectors uniformly at random (``torch.Generator`` seeded with ``seed``);
    ``fv``: all."""
    one_of("strategy", strategy, STRATEGIES)
    L, D = scores.shape
    if not 1 <= n_pv <= L * D:
        raise ValueError(f"FT-PV size {n_pv} is not in [1, {L * D}]")
    flat = torch.zeros(L * D, dtype=torch.bool)
    if strategy == "fv":
        flat[:] = True
    elif strategy in ("pv", "cv"):
        order = torch.sort(scores.reshape(-1).cpu(), descending=True, stable=True).indices
        flat[order[:n_pv]] = True
        if strategy == "cv":
            flat = ~flat
    else:
        g = torch.Generator().manual_seed(seed)
        flat[torch.randperm(L * D, generator=g)[:n_pv]] = True
    return flat.view(L, D)


# ---------------------------------------------------------------------------------------
# training


def training_texts(probe: ProbeSet, concepts: Sequence[str]) -> List[str]:
    """The trained concepts' ``facts``, each distinct sentence once, in probe order."""
    keep, seen, out = set(concepts), set(), []
    for q in probe.questions:
        if q.concept in keep:
            for f in q.facts:
                if f not in seen:
                    seen.add(f)
                    out.append(f)
    if not out:
        raise ValueError(f"the trained concepts {list(concepts)} have no 'facts' in probe '{probe.name}'")
    return out


def finetune_deltas(lm: LoadedModel, examples: Sequence[training.Example], selected: torch.Tensor,
                    cfg: training.TrainConfig, *, progress: bool = False) -> Tuple[ColumnDeltas, training.TrainResult]:
    """Train one delta per layer on the ``selected`` columns of the down-projections
    (:class:`ColumnDeltas`) with :func:`specext.pipelines.training.train`; the model's own
    parameters are frozen and unchanged. Returns the deltas (not yet merged) and the result."""
    deltas = ColumnDeltas(lm.sites, selected)
    if not deltas.parameters():
        raise ValueError("the selection is empty: nothing to train")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with deltas.attached():
        res = training.train(lm.model, examples, cfg, pad_id=pad, params=deltas.parameters(), progress=progress)
    return deltas, res


# ---------------------------------------------------------------------------------------
# evaluation


def _hallucination_modules():
    try:
        from specext.metrics import hallucination
        from specext.probes import sampling
    except ImportError as e:
        raise ImportError(f"semantic entropy and LID need specext.metrics.hallucination and specext.probes.sampling "
                          f"({e}); pass --se-samples 0 --lid-k 0 to leave them out") from None
    return hallucination, sampling


def _mean(xs) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None and x == x]  # host: plain Python numbers
    return sum(xs) / len(xs) if xs else None


def evaluate(lm: LoadedModel, probe: ProbeSet, trained: Sequence[str], control: Sequence[int], cfg: FinetuneConfig,
             seed: int, *, nli=None, progress: bool = False, label: str = "") -> Tuple[Dict[str, object], torch.Tensor]:
    """The model's measures on the trained concepts and on the control questions.

    One pass over the whole probe (multiple choice, greedy open-ended answer, prompt
    statistics into the concept mass) gives the accuracies and the concept mass; PSS of
    the trained concepts uses that mass (differential scores against all other concepts)
    and the pass's overall ``mcq`` accuracy as denominator, on a control set seeded with
    ``cfg.seed`` (the same for every model). Semantic entropy samples ``cfg.se_samples``
    answers per question at ``cfg.se_temperature`` with ``seed``; LID uses the last layer's
    hidden state at the answer position of each question of the set. Returns the metrics
    (a flat ``table`` dict of :data:`METRICS` plus details) and the ``(K, L, d_ff)`` mass."""
    from specext._progress import progress as tqdm

    t0 = time.time()
    K = len(probe.concepts)
    mass = ConceptMass(K, lm.n_layers, lm.d_ff, device=accumulate_devices("auto", lm))
    scorer = Scorer(lm, positions=cfg.positions, open_ended=True, max_new_tokens=cfg.max_new_tokens)
    scorer.check(probe.questions)
    runner = _Runner(lm, scorer, probe, mass, cfg.eval_batch_size)
    with tqdm(total=len(probe.questions), desc=f"{label} scoring".strip(), unit="q", disable=not progress,
              leave=False) as bar:
        rows = runner.run(probe.questions, bar.update)
    keep = set(trained)
    t_idx = [i for i, q in enumerate(probe.questions) if q.concept in keep]
    sets = {"trained": t_idx, "control": list(control)}
    out: Dict[str, object] = {}
    table: Dict[str, Optional[float]] = {}
    for name, idx in sets.items():
        acc = accuracy_by_group([rows[i] for i in idx])
        out[name] = {"questions": len(idx), "mcq": acc["mcq"], "mcq_norm": acc["mcq_norm"], "open": acc["open"]}
        if name == "trained":
            out[name]["by_concept"] = acc["by_concept"]
        for k in ("mcq", "mcq_norm", "open"):
            table[f"{name}_{k}"] = acc[k]
    overall = accuracy_by_group(rows)
    out["probe"] = {"questions": len(rows), "mcq": overall["mcq"], "mcq_norm": overall["mcq_norm"],
                    "open": overall["open"]}

    # PSS of the trained concepts on this model's own concept mass.
    cm = mass.concept_mass()
    if cfg.stat == "contribution":
        cm = cm * value_norms(lm).to(cm.device)[None]
    pss_cfg = PSSConfig(ratios=cfg.pss_ratios, unrelated=cfg.unrelated, control_size=cfg.pss_control,
                        random_control=False, seed=cfg.seed, bootstrap=0)
    ms = MaskedScorer(lm, batch_rows=pss_cfg.batch_rows, metric="mcq", scorer=Scorer(lm, open_ended=False))
    # G's control questions come from untrained concepts only: a trained concept's questions
    # would move G with the training, not only with the mask
    pss = compute_pss(lm, probe, cm, pss_cfg, overall_accuracy=overall["mcq"], progress=progress, scorer=ms,
                      concepts=list(trained), control=control_questions(probe, trained, cfg.pss_control, cfg.seed))
    s = pss.summary
    out["pss"] = {"ratios": s["ratios"], "curve": s["paper"]["curve"], "delta_curve": s["delta"]["curve"],
                  "peak": s["paper"]["peak"], "peak_ratio": s["paper"]["peak_ratio"], "delta_peak": s["delta"]["peak"],
                  "delta_peak_ratio": s["delta"]["peak_ratio"], "floor": s["floor"], "denominator": overall["mcq"],
                  "control_questions": s["control_questions"],
                  "by_concept": {c: [r["pss"] for r in pss.rows if r["concept"] == c] for c in trained}}
    table["pss_peak"] = _finite(s["paper"]["peak"])
    table["pss_delta_peak"] = _finite(s["delta"]["peak"])

    # Hallucination measures.
    if cfg.se_samples or cfg.lid_k:
        hall, sampling = _hallucination_modules()
    for name, idx in sets.items():
        qs = [probe.questions[i] for i in idx]
        se = lid = None
        if cfg.se_samples:
            answers = sampling.sample_answers(lm, qs, n=cfg.se_samples, temperature=cfg.se_temperature, seed=seed,
                                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
            per_q = [float(hall.semantic_entropy(a, q, nli=nli)) for a, q in zip(answers, qs)]
            se = _mean(per_q)
            out[name]["se_per_question"] = per_q
        if cfg.lid_k:
            k = min(cfg.lid_k, len(qs) - 1)
            if k < 1:
                logger.warning("LID: the %s set has %d question(s); LID needs at least 2", name, len(qs))
            else:
                if k < cfg.lid_k:
                    logger.warning("LID: --lid-k %d but the %s set has %d questions: using k = %d", cfg.lid_k, name,
                                   len(qs), k)
                points = sampling.answer_hidden_states(lm, qs, batch_size=cfg.eval_batch_size)
                lid = _finite(float(hall.lid_mean(points.float().cpu(), k)))
                out[name]["lid_k"] = k
        out[name]["se"], out[name]["lid"] = se, lid
        table[f"{name}_se"], table[f"{name}_lid"] = se, lid
    out["table"] = table
    out["seconds"] = round(time.time() - t0, 2)
    return out, cm


def _finite(v) -> Optional[float]:
    return float(v) if v is not None and v == v and abs(v) != math.inf else None


# ---------------------------------------------------------------------------------------
# the run directory


def _fingerprint(cfg: FinetuneConfig, probe: ProbeSet, trained: Sequence[str], run: Optional[FromRun],
                 cache: Path) -> Dict[str, object]:
    """What must match for ``--resume`` to keep a finished run: the options that change
    results, the trained concepts, the model's config and weights (bytes), the probe file
    and the analyze run's files."""
    model_dir = Path(cfg.model_dir)
    opts = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULTS}
    opts["concepts"] = list(trained)
    files = sorted(model_dir.glob("*.safetensors"))
    src = probe.questions[0].source.rsplit(":", 1)[0] if probe.questions else ""
    fp = {"options": opts, "model_config_sha256": rundir.sha256_file(model_dir / "config.json"),
          "weights_sha256": rundir.weights_fingerprint(files, cache) if files else None,
          "probe_sha256": rundir.sha256_file(src) if src and Path(src).is_file() else None,
          "from_run": run.fingerprint if run is not None else None}
    return json.loads(json.dumps(fp))


def _read_marker(path: Path, fp: Dict[str, object]) -> Optional[dict]:
    """A finished run's record if ``path`` holds one made with the same inputs; a record made
    with other inputs is an error (as ``analyze --resume``)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("--resume: %s is damaged (%s); redoing that run", path, e)
        return None
    if not isinstance(rec, dict) or "evaluation" not in rec:
        return None
    rec = {k: rec[k] for k in RUN_KEYS if k in rec}  # a single run's file also holds the experiment's table
    if rec.get("fingerprint") != fp:
        old = rec.get("fingerprint") if isinstance(rec.get("fingerprint"), dict) else {}
        changes = rundir.fingerprint_changes(old, fp)
        raise ValueError(f"--resume: {path} was made with different inputs ({'; '.join(changes)}); use another "
                         "--out or drop --resume")
    return rec


def _save_model(lm: LoadedModel, run_dir: Path) -> List[str]:
    """``save_pretrained`` (config, safetensors weights) and the tokenizer into ``run_dir``,
    file by file through a temporary folder inside it (each file appears whole; the folder's
    other files stay). Weight files of an earlier save that this one did not write are
    removed. Returns the file names."""
    tmp = run_dir / f".model-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, run_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = {"selected.safetensors", "delta.safetensors", "selection.safetensors"}
    for p in run_dir.iterdir():
        if p.name not in names and p.name not in ours and (p.name.startswith("model") and
                                                            p.name.endswith((".safetensors", ".safetensors.index.json"))):
            p.unlink()
    return names


def _run_dir(out: Path, strategy: str, seed: int, single: bool) -> Path:
    return out if single else out / strategy / f"seed-{seed}"


def run_finetune(cfg: FinetuneConfig, *, progress: bool = True,
                 on_checkpoint: Optional[Callable[[str, int], None]] = None) -> Dict[str, object]:
    """The whole experiment; writes the output directory and returns ``results.json``'s
    content. ``on_checkpoint(stage, n)`` is called after ``("original", 0)`` is on disk and
    after each finished run (``("run", runs_done)``; the kill-and-resume test uses it)."""
    require("transformers", "tokenizers", "tqdm", *(("matplotlib",) if cfg.report else ()), what="run_finetune")
    t_start = time.time()
    check_model_dir(cfg.model_dir, cfg.allow_pickle)  # a wrong MODEL_DIR fails before anything else
    probe = load_probe(cfg.probe)
    run = load_run(cfg.from_run) if cfg.from_run else None
    trained = choose_concepts(probe, cfg, run)
    out = Path(cfg.out) if cfg.out else Path("specext-runs") / f"finetune-{Path(cfg.model_dir).name}-{probe.name}"
    made = rundir.missing_root(out)  # the folder this run creates, if any: removed again if it fails early
    rundir.check_writable(out)
    lock = rundir.RunLock(out).acquire()
    try:
        # one run, of one kind, per directory: the same rules as analyze's --out
        rundir.prepare_out(out, resume=cfg.resume, overwrite=cfg.overwrite, kind="finetune")
    except (ValueError, OSError):
        lock.release(remove=lock.created)  # refused: leave the folder as it was
        raise
    with lock:
        try:
            return _locked(cfg, probe, run, trained, out, t_start, progress, on_checkpoint)
        except BaseException:
            if made is not None:  # failed before the original's evaluation: no run directory left behind
                rundir.discard_new(out, made, lock, keep=rundir.FINETUNE_MARKERS)
            raise


def _check_layout(out: Path, single: bool) -> None:
    """``--resume`` keeps the layout of the run it continues: a single strategy and seed
    writes into ``out`` itself, several into ``out/STRATEGY/seed-S``; a mix is refused."""
    nested = sorted(str(p.relative_to(out)) for s in STRATEGIES for p in (out / s).glob("seed-*") if p.is_dir())
    flat = [n for n in ("selected.safetensors", "delta.safetensors") if (out / n).is_file()]
    if single and nested:
        raise ValueError(f"--resume: --out {out} holds runs of several strategies or seeds ({', '.join(nested[:4])}) "
                         "but this is one strategy and seed, which writes into --out itself: resume with that run's "
                         "--strategy and --seeds, or use another --out")
    if not single and flat:
        raise ValueError(f"--resume: --out {out} holds a single strategy's run ({', '.join(flat)} in --out itself) "
                         "but this run has several strategies or seeds (one folder each): resume with that run's "
                         "--strategy and --seeds, or use another --out")


def _from_run_warnings(cfg: FinetuneConfig, run: FromRun, fp, probe: ProbeSet, trained: Sequence[str]) -> List[str]:
    """:func:`check_from_run`'s differences: an error, or with ``--allow-run-mismatch``
    warnings (logged, and recorded in results.json)."""
    diffs = check_from_run(run, cfg.model_dir, fp, probe, trained)
    if not diffs:
        return []
    src = (run.made_on or {}).get("model_dir") or "unknown"
    head = (f"--from-run {run.path} (made on model {src}, probe {(run.made_on or {}).get('probe') or 'unknown'}) does "
            f"not match this experiment (MODEL_DIR {cfg.model_dir}, probe '{probe.name}')")
    if not cfg.allow_run_mismatch:
        raise ValueError(f"{head}: " + "; ".join(diffs) + ". Its concept mass would rank another model's (or other "
                         "questions') value vectors: run python -m specext.analyze on MODEL_DIR with this probe, or "
                         "pass --allow-run-mismatch to use the run anyway (recorded as a warning in results.json)")
    warnings = [f"--allow-run-mismatch: {head}: {d}" for d in diffs]
    for w in warnings:
        logger.warning("%s", w)
    return warnings


def _locked(cfg: FinetuneConfig, probe: ProbeSet, run: Optional[FromRun], trained: List[str], out: Path,
            t_start: float, progress: bool, on_checkpoint) -> Dict[str, object]:
    from specext._progress import progress as tqdm

    strategies, seeds = cfg.strategies, cfg.seed_list
    single = len(strategies) == 1 and len(seeds) == 1
    plan = [(s, seed) for s in strategies for seed in seeds]
    fp = _fingerprint(cfg, probe, trained, run, out / rundir.WEIGHTS_CACHE)
    # Every check before anything is written or removed: the analyze run's model and probe,
    # and under --resume the layout and every finished marker's inputs.
    warnings = _from_run_warnings(cfg, run, fp, probe, trained) if run is not None else []
    done: Dict[Tuple[str, int], dict] = {}
    original = None
    if cfg.resume:
        _check_layout(out, single)
        original = _read_marker(out / "original.json", fp)
        for s, sd in plan:
            rec = _read_marker(_run_dir(out, s, sd, single) / "results.json", fp)
            if rec is not None:
                done[(s, sd)] = rec
    for name in ("results.json", "results.csv", "results.html", "results.png"):
        if not single or name != "results.json":
            (out / name).unlink(missing_ok=True)  # a complete experiment has them: written last
    if not cfg.resume:
        for p in [out / "original.json"] + [_run_dir(out, s, sd, single) / "results.json" for s, sd in plan]:
            p.unlink(missing_ok=True)
    lm = load_model(cfg.model_dir, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                    allow_pickle=cfg.allow_pickle, device_map=cfg.device_map, max_memory=cfg.max_memory)
    if not lm.has_lm_head:
        raise ValueError(f"{cfg.model_dir}: fine-tuning needs a causal language model (the model has no LM head)")
    nli = _load_nli(cfg.nli_model) if cfg.nli_model and cfg.se_samples else None
    control = control_questions(probe, trained, cfg.control_size, cfg.seed)
    K, L, D = len(probe.concepts), lm.n_layers, lm.d_ff
    logger.info("trained concepts (%d): %s; control set: %d questions of other concepts", len(trained),
                ", ".join(trained), len(control))

    # The original model: its evaluation and the selection's scores.
    if original is not None and (out / "selection.safetensors").is_file():
        scores = rundir.read_safetensors(out / "selection.safetensors")["score"]
        logger.info("--resume: the original model's evaluation and the selection from %s", out)
    else:
        run_scores = None
        if run is not None:  # checked before minutes of evaluation, not after
            if cfg.ratio is None and run.peak_ratio is None:
                raise ValueError(f"--from-run {run.path} has no PSS (run without --no-pss) and no --ratio was given")
            mass, cats = _run_mass(run, probe, trained, L, D)
            run_scores = vector_scores(mass, cats, [run.concepts.index(c) for c in trained], cfg.unrelated,
                                       run.concepts)
        ev, cm = evaluate(lm, probe, trained, control, cfg, cfg.seed, nli=nli, progress=progress, label="original")
        if run_scores is not None:
            scores = run_scores
        else:
            scores = vector_scores(cm.cpu(), probe.concept_category, [probe.concepts.index(c) for c in trained],
                                   cfg.unrelated, probe.concepts)
        ratio = cfg.ratio
        ratio_source = "--ratio"
        if ratio is None and run is not None:
            ratio, ratio_source = run.peak_ratio, f"peak PSS ratio of {run.path}"
        if ratio is None:
            ratio, ratio_source = ev["pss"]["peak_ratio"], "peak PSS ratio of the trained concepts (original model)"
            if ratio is None:
                raise ValueError("the trained concepts' PSS curve has no finite point (accuracy 0?); give --ratio")
        k, n_pv = pv_count(float(ratio), L, D, cfg.pv_fraction)
        selection = {"ratio": float(ratio), "ratio_source": ratio_source, "k": k, "pv_fraction": cfg.pv_fraction,
                     "n_pv": n_pv, "scores_from": str(run.path / "mass.safetensors") if run else "the original model's "
                     "concept mass on the probe", "unrelated": cfg.unrelated, "concepts": trained}
        rundir.write_safetensors(out / "selection.safetensors", {"score": scores.contiguous()},
                                 metadata={"selection": json.dumps(selection)})
        original = {"fingerprint": fp, "evaluation": ev, "selection": selection}
        rundir.write_json(out / "original.json", original)  # last: marks the original's evaluation done
    if on_checkpoint:
        on_checkpoint("original", 0)
    selection = original["selection"]
    n_pv = selection["n_pv"]
    logger.info("selection: ratio %g%% (%s): k = %d vectors, FT-PV = %d (x%g), FT-CV = %d, FT-RV = %d, FT-FV = %d",
                selection["ratio"], selection["ratio_source"], selection["k"], n_pv, cfg.pv_fraction, L * D - n_pv,
                n_pv, L * D)

    examples = training.encode_texts(lm.tokenizer, training_texts(probe, trained))
    records: List[dict] = []
    with tqdm(total=len(plan), desc="fine-tuning runs", unit="run", disable=not progress) as bar:
        for strategy, seed in plan:
            run_dir = _run_dir(out, strategy, seed, single)
            rec = done.get((strategy, seed))
            if rec is not None:
                logger.info("--resume: %s seed %d already done (%s)", LABELS[strategy], seed, run_dir)
            else:
                bar.set_postfix_str(f"{LABELS[strategy]} seed {seed}")
                rec = _one_run(lm, probe, examples, trained, control, scores, n_pv, strategy, seed, cfg, fp, run_dir,
                               nli, progress)
            records.append(rec)
            bar.update(1)
            if on_checkpoint:
                on_checkpoint("run", len(records))

    table = summary_table(original, records)
    results = {
        "model": str(cfg.model_dir),
        "probe": probe.name,
        "concepts": trained,
        "control_questions": len(control),
        "selection": selection,
        "table": table,
        "metrics": [{"key": k, "label": l} for k, l in METRICS],
        "notes": _notes(cfg),
        "warnings": warnings,  # e.g. --allow-run-mismatch: what differs between --from-run and this experiment
        "outputs": ["results.csv", "results.json"] + (["results.html", "results.png"] if cfg.report else []),
        "original": original["evaluation"],
        "runs": records,
        "options": asdict(cfg),
        "fingerprint": fp,
        "versions": {"specext": __version__, **lm.info, "python": platform.python_version()},
        "seconds": round(time.time() - t_start, 2),
    }
    if single:  # the run's own record is this directory's results.json: keep its fields
        results = {**records[0], **results}
    rundir.write_text(out / "results.csv", results_csv(table))
    if cfg.report:
        from specext.report.finetune import write_finetune_report

        header = {"model": cfg.model_dir, "probe": probe.name, "trained concepts": ", ".join(trained),
                  "control set": f"{len(control)} questions of other concepts",
                  "selection": f"ratio {selection['ratio']:g}% ({selection['ratio_source']}): k = {selection['k']}, "
                               f"FT-PV = top {n_pv} (k x {cfg.pv_fraction:g}), FT-RV = {n_pv} random, FT-CV = "
                               f"{L * D - n_pv}, FT-FV = {L * D} of {L} x {D} value vectors",
                  "training": f"{cfg.steps} steps, lr {cfg.lr:g}, batch {cfg.batch_size} x {cfg.grad_accum}, "
                              f"seeds {', '.join(map(str, seeds))}"}
        write_finetune_report(out, table, METRICS, header, _notes(cfg))
    rundir.write_json(out / "results.json", results)  # last: the experiment is complete
    logger.info("wrote %s", out)
    return results


def _run_mass(run: FromRun, probe: ProbeSet, trained: Sequence[str], L: int, D: int):
    """The run's concept mass and each concept's category index, checked against the model."""
    if tuple(run.mass.shape[1:]) != (L, D):
        raise ValueError(f"--from-run {run.path}: mass.safetensors is for {run.mass.shape[1]} layers x d_ff "
                         f"{run.mass.shape[2]}, the model has {L} x {D}: a run of another model")
    missing = [c for c in trained if c not in run.concepts]
    if missing:
        raise ValueError(f"--from-run {run.path}: the trained concepts {missing} are not among the run's "
                         f"{len(run.concepts)} concepts (concepts.csv); run analyze on a probe that has them")
    cat_index: Dict[str, int] = {}
    cats = [cat_index.setdefault(c, len(cat_index)) for c in run.categories]
    return run.mass, cats


def _load_nli(model_dir: str):
    hall, _ = _hallucination_modules()
    return hall.load_nli(model_dir)


def _notes(cfg: FinetuneConfig) -> List[str]:
    se = (f"semantic entropy: {cfg.se_samples} answers per question sampled at temperature {cfg.se_temperature:g}; "
          + (f"clustered by bidirectional entailment with the model in {cfg.nli_model}" if cfg.nli_model
             else SE_NOTE_MATCH)) if cfg.se_samples else "semantic entropy: off (--se-samples 0)"
    lid = (f"LID: maximum-likelihood estimate over {cfg.lid_k} nearest neighbours of the last layer's hidden state at "
           "the answer position, mean over the set's questions" if cfg.lid_k else "LID: off (--lid-k 0)")
    pss = (f"PSS: the paper's |G - CS| / A and the baseline-corrected delta of each trained concept, on the model's "
           f"own concept mass, peak over ratios {', '.join(f'{r:g}' for r in cfg.pss_ratios)}% of the mean over the "
           f"trained concepts; A = the model's mcq accuracy on the whole probe; {cfg.pss_control} control questions")
    return [se, lid, pss, "Error bars and ± are one standard deviation over seeds (sample, n - 1); the original "
            "model is evaluated once; every model's answers are sampled with seed " + str(cfg.seed) + " (common random "
            "numbers)."]


def _one_run(lm: LoadedModel, probe: ProbeSet, examples, trained, control, scores: torch.Tensor, n_pv: int,
             strategy: str, seed: int, cfg: FinetuneConfig, fp, run_dir: Path, nli, progress: bool) -> dict:
    """Fine-tune one strategy with one seed, evaluate, save; the model's weights are put
    back exactly afterwards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").unlink(missing_ok=True)
    selected = select(strategy, scores, n_pv, seed)
    label = f"{LABELS[strategy]} seed {seed}"
    logger.info("%s: training %d value vectors", label, int(selected.sum()))
    deltas, res = finetune_deltas(lm, examples, selected, cfg.train_config(seed), progress=progress)
    snap = deltas.snapshot()
    try:
        deltas.merge_()
        # Every model's answers are sampled with the same seed (common random numbers: per-answer
        # generators, specext.probes.sampling), so differences come from the models.
        ev, _ = evaluate(lm, probe, trained, control, cfg, cfg.seed, nli=nli, progress=progress, label=label)
        files = _save_model(lm, run_dir) if cfg.save_model else []
        rundir.write_safetensors(run_dir / "selected.safetensors", {"selected": selected},
                                 metadata={"strategy": strategy, "seed": str(seed)})
        rundir.write_safetensors(run_dir / "delta.safetensors", deltas.state(),
                                 metadata={"strategy": strategy, "seed": str(seed),
                                           "layout": "index.L: columns of layer L's down-projection (d_model, d_ff); "
                                                     "delta.L: (d_model, len(index.L)) added to them"})
    finally:
        deltas.restore(snap)
    rec = {
        "strategy": strategy, "label": LABELS[strategy], "seed": seed, "run_dir": str(run_dir),
        "vectors": int(selected.sum()), "trained_parameters": res.n_trained_parameters,
        "optimizer_state_bytes": res.optimizer_state_bytes,
        "train": {"steps": res.steps, "initial_loss": res.initial_loss, "final_loss": res.final_loss,
                  "losses": res.losses, "target_tokens": res.n_targets, "seconds": round(res.seconds, 2),
                  "examples": len(examples)},
        "evaluation": ev, "model_files": files, "fingerprint": fp,
    }
    rundir.write_json(run_dir / "results.json", rec)  # last: marks the run complete
    return rec


# ---------------------------------------------------------------------------------------
# the table


def _stats(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    v = [x for x in values if x is not None and x == x]
    if not v:
        return None, None
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, s


def summary_table(original: dict, records: Sequence[dict]) -> List[Dict[str, object]]:
    """Strategy x metric: the original model first, then each strategy in the order run, each
    metric's mean over seeds and its standard deviation (``KEY_std``, None for one seed)."""
    ev = original["evaluation"]["table"]
    rows = [{"strategy": "original", "key": "original", "seeds": 1, "vectors": 0, "final_loss": None,
             "final_loss_std": None, **{k: ev.get(k) for k, _ in METRICS}, **{f"{k}_std": None for k, _ in METRICS}}]
    for s in dict.fromkeys(r["strategy"] for r in records):
        rs = [r for r in records if r["strategy"] == s]
        row = {"strategy": LABELS[s], "key": s, "seeds": len(rs), "vectors": rs[0]["vectors"]}
        for k, _ in METRICS:
            row[k], row[f"{k}_std"] = _stats([r["evaluation"]["table"].get(k) for r in rs])
        row["final_loss"], row["final_loss_std"] = _stats([r["train"]["final_loss"] for r in rs])
        rows.append(row)
    return rows


def results_csv(table: Sequence[Dict[str, object]]) -> str:
    cols = ["strategy", "seeds", "vectors"] + [c for k, _ in METRICS for c in (k, f"{k}_std")] + ["final_loss",
                                                                                                  "final_loss_std"]
    fmt = lambda v: "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)  # noqa: E731
    return rundir.csv_text(cols, ([fmt(r.get(c)) for c in cols] for r in table))


# ---------------------------------------------------------------------------------------
# command line


def _fmt(v, s=None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f"±{s:.3f}" if s is not None else "")


def print_table(results: Dict[str, object], out: Path, file=None) -> None:
    file = file or sys.stdout
    table = results["table"]
    short = [("trained_mcq", "mcq"), ("trained_open", "open"), ("trained_se", "SE"), ("trained_lid", "LID"),
             ("pss_peak", "PSS"), ("control_mcq", "ctl mcq"), ("control_open", "ctl open")]
    sel = results["selection"]
    print(f"\nspecext finetune: {results['model']} on '{results['probe']}', trained concepts: "
          f"{', '.join(results['concepts'])}", file=file)
    print(f"  selection: ratio {sel['ratio']:g}% ({sel['ratio_source']}), k = {sel['k']}, FT-PV = {sel['n_pv']}",
          file=file)
    print("  " + f"{'strategy':<10}" + "".join(f"{l:>16}" for _, l in short), file=file)
    for r in table:
        print("  " + f"{r['strategy']:<10}" + "".join(f"{_fmt(r.get(k), r.get(k + '_std')):>16}" for k, _ in short),
              file=file)
    for n in results["notes"][:1]:
        print(f"  note: {n}", file=file)
    for w in results.get("warnings") or []:
        print(f"  warning: {w}", file=file)
    files = results.get("outputs") or ["results.csv", "results.json"]
    print(f"  output {out} ({', '.join(files)}; {results['seconds']} s)", file=file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specext.finetune", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=DefaultsFormatter)
    p.add_argument("model_dir", nargs="?", help="local Hugging Face causal LM directory (config.json, *.safetensors, "
                                                "tokenizer)")
    p.add_argument("--demo", action="store_true", help="the small model trained on the synthetic world without its "
                   "held-out concepts, fine-tuned on them (probe: synthetic)")
    c = p.add_argument_group("what to train")
    c.add_argument("--concepts", default=None, help="the trained concepts, comma-separated names")
    c.add_argument("--top-concepts", type=int, default=None, metavar="N",
                   help="train N concepts: the highest PSS in --from-run's pss.csv, else a seeded stratified sample")
    c.add_argument("--tier", default=None, help="--top-concepts from this frequency tier (e.g. high)")
    c.add_argument("--strategy", default="all", choices=list(STRATEGIES) + ["all"],
                   help="fv: all value vectors; pv: the top k x --pv-fraction by differential score; cv: all but pv; "
                        "rv: as many as pv at random; all: the four")
    c.add_argument("--probe", default=None, help="world | synthetic | a JSONL probe with 'facts' (default: world; "
                                                 "synthetic with --demo)")
    c.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="an analyze run directory of MODEL_DIR on this probe (checked: the model's config and weight "
                        "hashes, the trained concepts' questions): rank vectors by its concept mass, k at its peak "
                        "PSS ratio")
    c.add_argument("--allow-run-mismatch", action="store_true",
                   help="use --from-run even if it was made on another model or other questions for the trained "
                        "concepts: a warning recorded in results.json instead of an error")
    c.add_argument("--ratio", type=float, default=None, help="k = this percent of all vectors (default: the ratio "
                   "of peak PSS, of --from-run or of the trained concepts on the original model)")
    c.add_argument("--pv-fraction", type=float, default=0.125, help="FT-PV = the top k x this")
    c.add_argument("--seeds", type=int, default=None, help="runs per strategy (default 3 with --strategy all, else 1)")
    c.add_argument("--seed", type=int, default=0, help="the first seed")
    c.add_argument("--out", default=None, metavar="DIR",
                   help="output directory; it must be empty, or hold this experiment's earlier run with --resume, or "
                        "be replaced with --overwrite (default specext-runs/finetune-MODEL-PROBE; "
                        "specext-runs/finetune-demo with --demo)")
    c.add_argument("--overwrite", action="store_true",
                   help="clear --out first when it holds an earlier specext run, analyze or finetune (a folder of "
                        "other files is never deleted)")
    c.add_argument("--resume", action="store_true",
                   help="keep the finished (strategy, seed) runs in --out, which must hold a finetune run of the "
                        "same inputs")
    t = p.add_argument_group("training (equal for every strategy)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the deltas")
    t.add_argument("--steps", type=int, default=50, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="fact sentences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (then cosine decay)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the deltas")
    t.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="the model's dtype (the deltas train in float32)")
    t.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    t.add_argument("--device-map", default=None, choices=list(DEVICE_MAPS),
                   help="split the model over devices (accelerate); the deltas live on each layer's device")
    t.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...", help="per-device budget for --device-map")
    t.add_argument("--threads", type=int, default=None, help="torch threads while training")
    e = p.add_argument_group("evaluation")
    e.add_argument("--control-size", type=int, default=100, help="control questions of other concepts (forgetting)")
    e.add_argument("--eval-batch-size", type=int, default=16, help="questions per forward pass when evaluating")
    e.add_argument("--positions", default="question", choices=list(POSITIONS), help="tokens of the prompt statistic")
    e.add_argument("--stat", default="abs", choices=list(STATS), help="mass statistic: abs |m|, contribution |m| x ||v||")
    e.add_argument("--unrelated", default="other", choices=list(UNRELATED),
                   help="concepts subtracted in the differential score")
    e.add_argument("--pss-ratios", default=",".join(f"{r:g}" for r in RATIOS),
                   help="PSS ratios (percent), comma-separated")
    e.add_argument("--pss-control", type=int, default=100, help="PSS control questions")
    e.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per open-ended answer")
    e.add_argument("--se-samples", type=int, default=10, help="sampled answers per question for semantic entropy "
                   "(0: off)")
    e.add_argument("--se-temperature", type=float, default=1.0, help="sampling temperature of the semantic-entropy answers")
    e.add_argument("--nli-model", default=None, metavar="DIR",
                   help="a local entailment model to cluster answers (default: normalised matching)")
    e.add_argument("--lid-k", type=int, default=10, help="nearest neighbours of the LID estimator (0: off)")
    p.add_argument("--no-save-model", action="store_true", help="do not save the fine-tuned models (only "
                   "selected.safetensors, delta.safetensors and results)")
    p.add_argument("--no-report", action="store_true", help="skip results.html and results.png")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model directory's own Python code")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a checkpoint with only pickled *.bin weights (unpickling can run code)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def _demo_defaults(args) -> None:
    try:
        from specext.pipelines.demo_models import held_out_concepts, holdout_model_dir
    except ImportError as e:
        raise ValueError(f"--demo needs the held-out demo model (specext.pipelines.demo_models): {e}") from None
    if args.model_dir:
        raise ValueError("give either MODEL_DIR or --demo, not both")
    model_dir = holdout_model_dir()
    args.model_dir = str(model_dir)
    args.probe = args.probe or "synthetic"
    if args.concepts is None and args.top_concepts is None:
        args.concepts = ",".join(held_out_concepts(model_dir))
    if args.out is None:
        # the demo's own folder: a re-run replaces the previous demo run (unless --resume), as analyze --demo
        args.out = str(Path("specext-runs") / "finetune-demo")
        args.overwrite = args.overwrite or not args.resume


def main(argv: Optional[List[str]] = None, *, on_checkpoint: Optional[Callable[[str, int], None]] = None) -> int:
    """The command line; ``on_checkpoint`` is passed to :func:`run_finetune`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        if args.demo:
            _demo_defaults(args)
        if not args.model_dir:
            raise ValueError("MODEL_DIR is required (or --demo)")
        ratios = number_list("--pss-ratios", args.pss_ratios)
        concepts = None if args.concepts is None else tuple(c.strip() for c in args.concepts.split(",") if c.strip())
        cfg = FinetuneConfig(
            model_dir=args.model_dir, concepts=concepts, top_concepts=args.top_concepts, tier=args.tier,
            strategy=args.strategy, probe=args.probe or "world", from_run=args.from_run, ratio=args.ratio,
            pv_fraction=args.pv_fraction, seeds=args.seeds, seed=args.seed, out=args.out, resume=args.resume,
            overwrite=args.overwrite, allow_run_mismatch=args.allow_run_mismatch, allow_pickle=args.allow_pickle,
            lr=args.lr, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup=args.warmup,
            weight_decay=args.weight_decay, dtype=args.dtype, device=args.device, device_map=args.device_map,
            max_memory=args.max_memory, threads=args.threads, control_size=args.control_size,
            eval_batch_size=args.eval_batch_size, positions=args.positions, stat=args.stat, unrelated=args.unrelated,
            pss_ratios=ratios, pss_control=args.pss_control, max_new_tokens=args.max_new_tokens,
            se_samples=args.se_samples, se_temperature=args.se_temperature, nli_model=args.nli_model,
            lid_k=args.lid_k, save_model=not args.no_save_model, report=not args.no_report,
            trust_remote_code=args.trust_remote_code)
        results = run_finetune(cfg, progress=not args.quiet, on_checkpoint=on_checkpoint)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out) if cfg.out else Path("specext-runs") / f"finetune-{Path(cfg.model_dir).name}-{results['probe']}"
    print_table(results, out)
    return 0


__all__ = ["FinetuneConfig", "run_finetune", "evaluate", "finetune_deltas", "select", "vector_scores", "pv_count",
           "choose_concepts", "control_questions", "load_run", "summary_table", "main", "build_parser"]

if __name__ == "__main__":
    sys.exit(main())
