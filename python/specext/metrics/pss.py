"""The paper's Parameter Specialization Score (PSS): mask a concept's top value vectors and
measure how much more it hurts that concept than unrelated knowledge.

For concept ``k`` the differential score of value vector ``(l, i)`` is
``d_k = mass[k] - mean(mass[j] for j in unrelated(k))``; the top ``ratio`` percent of all
``L * d_ff`` vectors (globally, or per layer) are masked by zeroing their coefficients.
Under k's mask: ``CS_k`` = accuracy on k's questions, ``G_k`` = accuracy on a fixed,
seeded control set of other concepts' questions (k's own removed). Two scores per concept
and ratio, both always written:

- ``pss`` (the paper's): ``|G_k(r) - CS_k(r)| / A`` with ``A`` the model's overall probe
  accuracy before masking (``overall``, the paper's denominator and the default) or the
  control accuracy without a mask (``general``). It has a *floor*: before anything is
  masked ``|G_before - CS_before| / A`` is already non-zero whenever the concept is easier
  or harder than the control set; ``pss_floor`` reports it (the curve's point at ratio 0).
- ``pss_delta`` (baseline-corrected): ``|(G_before - G(r)) - (CS_before - CS(r))| / A``:
  masking that hurts the concept and the control equally scores 0.

``PSSConfig.score`` picks which one is the headline (``curve``, ``peak``, the report and
``specext.compare``). The model's curve is the mean over concepts, with a bootstrap
interval over concepts at every point and for the peak; a random-vector control (the same
number of uniformly random vectors) is measured at every ratio and summarised the same way.

Throughput: every (concept, ratio, kind) mask is one *row* of a batch, so many masks share
a forward pass; rows are grouped by question (no padding), and the question prefix is
encoded once per row, not once per option (:class:`specext.probes.scoring.Scorer`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from specext._options import at_least, one_of
from specext.models.loading import LoadedModel
from specext.probes.probeset import ProbeSet, Question, stratified_sample
from specext.metrics import bootstrap
from specext.probes.scoring import HalvingBatches, Scorer

logger = logging.getLogger(__name__)

RATIOS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
UNRELATED = ("other", "same-category", "other-category")
SELECTION = ("global", "per-layer")
RANDOM_MATCH = ("uniform", "layers")
DENOMINATORS = ("general", "overall")
METRICS = ("mcq", "mcq_norm")
SCORES = ("paper", "delta")


@dataclass
class PSSConfig:
    ratios: Tuple[float, ...] = RATIOS  # percent of all L * d_ff value vectors
    unrelated: str = "other"
    selection: str = "global"
    control_size: int = 200
    denominator: str = "overall"
    concepts: Optional[int] = None  # a seeded sample of concepts to evaluate
    metric: str = "mcq"
    random_control: bool = True
    seed: int = 0
    batch_rows: int = 256
    score: str = "paper"  # which score is the headline: the paper's or the baseline-corrected delta
    bootstrap: int = 1000  # resamples of concepts for the 95% intervals (0: no intervals)
    # the random control's vectors: uniform over the selection's range (the paper's), or as
    # many in each layer as the concept's top vectors (a stricter control under global selection)
    random_match: str = "uniform"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The options' own checks; run once, when the config is built."""
        if not self.ratios:
            raise ValueError("--ratios needs at least one ratio")
        for r in self.ratios:
            if not (isinstance(r, (int, float)) and 0 < r <= 100) or math.isnan(r):
                raise ValueError(f"--ratios: each ratio is a percentage in (0, 100], got {r!r}")
        dup = sorted({r for r in self.ratios if list(self.ratios).count(r) > 1})
        if dup:
            raise ValueError(f"--ratios: each ratio once (duplicates would give duplicate rows), got "
                             f"{', '.join(f'{r:g}' for r in dup)} more than once in {', '.join(f'{r:g}' for r in self.ratios)}")
        one_of("--pss-unrelated", self.unrelated, UNRELATED)
        one_of("--pss-selection", self.selection, SELECTION)
        one_of("--pss-random-match", self.random_match, RANDOM_MATCH)
        one_of("--pss-denominator", self.denominator, DENOMINATORS)
        one_of("--pss-score", self.score, SCORES)
        one_of("--pss-metric", self.metric, METRICS)
        at_least("--bootstrap", self.bootstrap, 10, off=0, unit=" resamples")
        at_least("--pss-control", self.control_size, 1)
        at_least("--pss-concepts", self.concepts, 1, optional=True)
        at_least("--pss-batch-rows", self.batch_rows, 1)

    def check_probe(self, probe: ProbeSet) -> None:
        """What PSS needs of a probe under these options (run before any scoring)."""
        if len(probe.concepts) < 2:
            raise ValueError(f"PSS needs at least 2 concepts (unrelated questions form the control set); "
                             f"probe '{probe.name}' has {len(probe.concepts)}")
        if self.unrelated == "other-category" and len(probe.categories) < 2:
            raise ValueError("--pss-unrelated other-category needs at least 2 categories")


# ---------------------------------------------------------------------------- vectors


class DifferentialScores:
    """Each concept's differential score, one concept at a time.

    ``d_k = mass[k] - mean(mass[j] for j unrelated to k)`` over ``L * d_ff`` value vectors,
    in float64, computed from per-category sums (``C x L*d_ff`` doubles: 110 MB for 6
    categories at the 70B shape) so that no ``K x L*d_ff`` matrix is ever built; ``mass`` is
    read one concept row at a time (it may live on the CPU while scores are computed on
    ``device``). The mean is over concepts, each weighted equally (docs/scores.md).
    Concepts with a non-finite row (no prompts) are left out of every mean and are invalid.
    """

    def __init__(self, mass: torch.Tensor, concept_category: Sequence[int], unrelated: str = "other",
                 device: Optional[torch.device] = None):
        if unrelated not in UNRELATED:
            raise ValueError(f"unrelated must be one of {UNRELATED}, got {unrelated!r}")
        K = mass.shape[0]
        self.mass = mass.reshape(K, -1)
        self.device = torch.device(device) if device is not None else self.mass.device
        self.unrelated = unrelated
        self.cat = [int(c) for c in concept_category]
        C = max(self.cat) + 1 if self.cat else 0
        N = self.mass.shape[1]
        self.cat_sums = torch.zeros((C, N), dtype=torch.float64, device=self.device)
        self.cat_n = [0] * C
        self.ok = []
        for k in range(K):
            row = self._row(k)
            good = bool(torch.isfinite(row).all())  # host: one flag per concept, by design
            self.ok.append(good)
            if good:
                self.cat_sums[self.cat[k]] += row
                self.cat_n[self.cat[k]] += 1
        self.total = self.cat_sums.sum(0)
        self.n_total = sum(self.cat_n)

    def _row(self, k: int) -> torch.Tensor:
        return self.mass[k].to(self.device, torch.float64)

    def _baseline(self, k: int):
        """(sum, count) of the concepts unrelated to ``k`` (``k`` itself never included)."""
        c, own = self.cat[k], self.ok[k]
        if self.unrelated == "other":
            return self.total, self.n_total, own
        if self.unrelated == "same-category":
            return self.cat_sums[c], self.cat_n[c], own
        return self.total - self.cat_sums[c], self.n_total - self.cat_n[c], False

    def valid(self, k: int) -> bool:
        _, n, own = self._baseline(k)
        return self.ok[k] and n - int(own) > 0

    def why_invalid(self, k: int) -> str:
        """Why concept ``k`` has no differential score ('' when it has one)."""
        if not self.ok[k]:
            return "no usable prompt (no question with finite activations at its positions)"
        if not self.valid(k):
            return {"same-category": "no other concept with a usable prompt in its category (--pss-unrelated "
                                     "same-category)",
                    "other-category": "no concept with a usable prompt in another category (--pss-unrelated "
                                      "other-category)"}.get(self.unrelated, "no other concept with a usable prompt")
        return ""

    def __call__(self, k: int) -> torch.Tensor:
        """``d_k`` as ``(L*d_ff,)`` float64 (all NaN for an invalid concept)."""
        row = self._row(k)
        if not self.valid(k):
            return torch.full_like(row, float("nan"))
        total, n, own = self._baseline(k)
        return row - ((total - row) / (n - 1) if own else total / n)


def differential_scores(mass: torch.Tensor, concept_category: Sequence[int], unrelated: str = "other") -> torch.Tensor:
    """``d (K, L*d_ff)`` float64, every concept's :class:`DifferentialScores` stacked (NaN rows
    for concepts without prompts). For small probes and tests; the PSS run streams."""
    ds = DifferentialScores(mass, concept_category, unrelated)
    return torch.stack([ds(k) for k in range(mass.shape[0])]) if mass.shape[0] else mass.reshape(0, -1).double()


def per_row(ratio: float, n_layers: int, d_ff: int, selection: str) -> int:
    """How many vectors ``ratio`` percent selects per row (at least one): of all ``L * d_ff``
    vectors (``global``, one row) or of each layer's ``d_ff`` (``per-layer``, one row each)."""
    return max(1, int(round(ratio / 100 * (n_layers * d_ff if selection == "global" else d_ff))))


def n_vectors(ratio: float, n_layers: int, d_ff: int, selection: str) -> int:
    """How many vectors ``ratio`` percent selects in all."""
    return per_row(ratio, n_layers, d_ff, selection) * (1 if selection == "global" else n_layers)


def top_vectors_all(d: torch.Tensor, ratios: Sequence[float], n_layers: int, d_ff: int,
                    selection: str = "global") -> Dict[float, torch.Tensor]:
    """Flat indices (into ``L * d_ff``, ascending) of the highest differential scores, for
    every ratio at once: one ``topk`` of the largest ratio, and each smaller ratio's set is
    its prefix. Ties at a ratio's boundary go to the lowest index (as a stable sort), found
    exactly: everything above the boundary value, then the first indices equal to it."""
    rows = d.reshape(1 if selection == "global" else n_layers, -1).double()
    width = rows.shape[1]
    ks = {r: per_row(r, n_layers, d_ff, selection) for r in ratios}
    kmax = min(max(ks.values()), width)
    vals = torch.topk(rows, kmax, dim=1, sorted=True).values  # (R, kmax), descending
    out = {}
    for r, k in ks.items():
        k = min(k, width)
        thr = vals[:, k - 1 : k]  # (R, 1) the boundary value of each row
        above = rows > thr
        need = k - above.sum(1, keepdim=True)
        tie = rows == thr
        mask = above | (tie & (tie.cumsum(1) <= need))
        out[r] = mask.reshape(-1).nonzero()[:, 0]
    return out


def top_vectors(d: torch.Tensor, ratio: float, n_layers: int, d_ff: int, selection: str = "global") -> torch.Tensor:
    """:func:`top_vectors_all` for one ratio."""
    return top_vectors_all(d, [ratio], n_layers, d_ff, selection)[ratio]


def random_vectors(ratio: float, n_layers: int, d_ff: int, selection: str, seed: int) -> torch.Tensor:
    """As many uniformly random vectors as :func:`top_vectors` selects, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    k = per_row(ratio, n_layers, d_ff, selection)
    if selection == "per-layer":
        idx = [torch.randperm(d_ff, generator=g)[:k] + l * d_ff for l in range(n_layers)]
        return torch.cat(idx).sort().values
    return torch.randperm(n_layers * d_ff, generator=g)[:k].sort().values


def random_like(top: torch.Tensor, n_layers: int, d_ff: int, seed: int) -> torch.Tensor:
    """As many random vectors in each layer as ``top`` (flat indices) has there, from a seeded
    generator: the layer-matched random control (``--pss-random-match layers``). Under global
    selection the top vectors are not spread evenly over the layers; this control masks the
    same number in each layer, so it differs from the top vectors only in *which* vectors of
    a layer are masked, not in how many per layer."""
    g = torch.Generator().manual_seed(seed)
    per_layer = torch.bincount(top.long() // d_ff, minlength=n_layers).tolist()  # host: L counts
    idx = [torch.randperm(d_ff, generator=g)[:n] + l * d_ff for l, n in enumerate(per_layer) if n]
    return torch.cat(idx).sort().values if idx else torch.empty(0, dtype=torch.long)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def control_set(probe: ProbeSet, size: int, seed: int = 0) -> List[int]:
    """A fixed, seeded sample of ``size`` question indices with at least one question per
    category (when ``size`` allows), in probe order."""
    rng = random.Random(seed)
    by_cat: Dict[str, List[int]] = {}
    for i, q in enumerate(probe.questions):
        by_cat.setdefault(q.category, []).append(i)
    size = min(size, len(probe.questions))
    chosen = set()
    for cat in probe.categories:
        if len(chosen) < size:
            chosen.add(rng.choice(by_cat[cat]))
    rest = [i for i in range(len(probe.questions)) if i not in chosen]
    chosen.update(rng.sample(rest, size - len(chosen)))
    return sorted(chosen)


# ---------------------------------------------------------------------------- masked scoring


class MaskedScorer:
    """Correctness of (question, mask) jobs, many masks per forward pass.

    ``masks[key]`` is a LongTensor of flat vector indices (``None`` = no mask). Jobs are
    grouped by question so a batch holds one prompt under up to ``batch_rows`` masks.
    """

    def __init__(self, lm: LoadedModel, *, batch_rows: int = 256, metric: str = "mcq", scorer: Optional[Scorer] = None):
        self.lm = lm
        self.scorer = scorer or Scorer(lm, open_ended=False)
        self.batches = HalvingBatches(batch_rows, lm.device, "PSS")
        self.metric = metric

    @property
    def batch_rows(self) -> int:
        return self.batches.size

    @batch_rows.setter
    def batch_rows(self, n: int) -> None:
        self.batches.size = n

    def correctness(self, jobs: Sequence[Tuple[int, object]], masks: Dict[object, Optional[torch.Tensor]],
                    questions: Sequence[Question], progress: Optional[Callable[[int], None]] = None) -> Dict[Tuple[int, object], bool]:
        lm = self.lm
        L, D = lm.n_layers, lm.d_ff
        order = sorted(jobs, key=lambda j: (j[0], str(j[1])))
        out: Dict[Tuple[int, object], bool] = {}

        def compute(batch):
            B = len(batch)
            mult = torch.ones((B, L * D), dtype=lm.dtype, device=lm.device)
            rows, cols = [], []
            for r, (_, key) in enumerate(batch):
                m = masks[key]
                if m is not None and m.numel():
                    rows.append(torch.full((m.numel(),), r, dtype=torch.long))
                    cols.append(m.to(torch.long).cpu())
            if rows:
                mult[torch.cat(rows).to(lm.device), torch.cat(cols).to(lm.device)] = 0
            mult = mult.view(B, L, D)
            # Each layer's slice on the device its layer computes on (a model split by a device
            # map), once per batch; a no-op view where it already is.
            per_layer = [mult[:, l, :].to(dev) for l, dev in enumerate(lm.layer_devices)]
            return self.scorer.score([questions[q] for q, _ in batch], row_masks=per_layer.__getitem__)

        def commit(batch, res):
            for (q, key), rr in zip(batch, res):
                out[(q, key)] = rr.mcq_correct if self.metric == "mcq" else rr.mcq_norm_correct
            if progress:
                progress(len(batch))

        self.batches.run(order, compute, commit)
        return out


# ---------------------------------------------------------------------------- PSS


@dataclass
class PSSResult:
    rows: List[Dict[str, object]]  # one per (concept, ratio)
    summary: Dict[str, object]
    layer_counts: Dict[float, List[float]] = field(default_factory=dict)  # ratio -> mean vectors per layer


def pss_value(g: float, cs: float, g_before: float) -> float:
    """The paper's ``|G - CS| / denominator`` (NaN when the denominator is 0 or missing)."""
    return abs(g - cs) / g_before if g_before is not None and g_before > 0 else float("nan")


def pss_delta_value(g: float, cs: float, g0: float, cs0: float, denominator: float) -> float:
    """Baseline-corrected ``|(G_before - G) - (CS_before - CS)| / denominator``: 0 when masking
    costs the concept exactly what it costs the control (NaN when the denominator is 0)."""
    if denominator is None or not denominator > 0:
        return float("nan")
    return abs((g0 - g) - (cs0 - cs)) / denominator


def pss_delta_signed_value(g: float, cs: float, g0: float, cs0: float, denominator: float) -> float:
    """``((CS_before - CS) - (G_before - G)) / denominator``: how much more the mask cost the
    concept than the control, signed. Unlike :func:`pss_delta_value` it is centred on 0 when
    masking does nothing concept-specific (noise moves it both ways), so its mean over
    concepts and that mean's interval say whether there is a concept-specific effect at all
    (NaN when the denominator is 0)."""
    if denominator is None or not denominator > 0:
        return float("nan")
    return ((cs0 - cs) - (g0 - g)) / denominator


def compute_pss(lm: LoadedModel, probe: ProbeSet, concept_mass: torch.Tensor, cfg: PSSConfig, *,
                overall_accuracy: Optional[float] = None, progress: bool = False,
                done: Optional[Dict[str, List[dict]]] = None,
                on_concept: Optional[Callable[[str, List[dict]], None]] = None,
                scorer: Optional[MaskedScorer] = None,
                share: Optional[Callable[[List[int]], List[int]]] = None,
                gather: Optional[Callable[[object], List[object]]] = None,
                concepts: Optional[Sequence[str]] = None,
                control: Optional[Sequence[int]] = None) -> PSSResult:
    """PSS for every (sampled) concept and ratio, plus the random-vector control.

    ``concepts``: evaluate exactly these concepts (names, in this order) instead of all
    or ``cfg.concepts``' sample; each must have a usable differential score.
    ``control``: the control questions' indices (G), instead of :func:`control_set`'s sample
    of ``cfg.control_size``; a caller that changed some concepts (fine-tuning) passes a set
    without any of them, so that G moves with the mask only. Each concept's own questions
    are left out of its control either way.

    ``concept_mass``: ``(K, L, d_ff)`` in probe concept order. ``done`` holds rows of
    concepts finished by an earlier (killed) run; ``on_concept`` is called after each
    concept with its rows (for checkpoints).

    Data parallel (the caller's process group): ``share(chosen)`` is the part of the chosen
    concepts this process masks, and ``gather(part)`` returns every process's ``part`` (a
    dict of its concepts' rows and its layer histogram); the rows come back in concept
    order and every process returns the whole result. The unmasked baseline is computed
    by every process over the same questions, so it is the same everywhere.
    """
    cfg.check_probe(probe)
    if not lm.has_lm_head:
        raise ValueError("PSS needs a language-model head (multiple-choice scoring); this model has none")
    ms = scorer or MaskedScorer(lm, batch_rows=cfg.batch_rows, metric=cfg.metric)
    if overall_accuracy is None:
        # Not given (analyze passes the scoring pass's): score the whole probe without a mask.
        every = ms.correctness([(q, None) for q in range(len(probe.questions))], {None: None}, probe.questions)
        overall_accuracy = float(np.mean([every[(q, None)] for q in range(len(probe.questions))]))
        logger.info("PSS: overall %s accuracy before masking %.4f", cfg.metric, overall_accuracy)
    if cfg.denominator == "overall" and not overall_accuracy > 0:
        logger.warning("PSS: the model's overall accuracy is %s, so every PSS (denominator 'overall') is NaN",
                       overall_accuracy)
    L, D = lm.n_layers, lm.d_ff
    dscore = DifferentialScores(concept_mass, probe.concept_category, cfg.unrelated, device=lm.device)
    valid = [k for k in range(len(probe.concepts)) if dscore.valid(k)]
    skipped = [{"concept": probe.concepts[k], "category": probe.categories[probe.concept_category[k]],
                "reason": dscore.why_invalid(k)} for k in range(len(probe.concepts)) if not dscore.valid(k)]
    if skipped:
        logger.warning("PSS: %d concept(s) without a usable differential score are skipped: %s", len(skipped),
                       "; ".join(f"{x['concept']} ({x['category']}): {x['reason']}" for x in skipped))
    if concepts is not None:
        index = {c: k for k, c in enumerate(probe.concepts)}
        unknown = [c for c in concepts if c not in index]
        unusable = [c for c in concepts if c in index and not dscore.valid(index[c])]
        if unknown or unusable or not concepts:
            raise ValueError(f"PSS: concepts {unknown} are not in probe '{probe.name}'" if unknown else
                             f"PSS: concepts {unusable} have no usable differential score (no usable prompt)"
                             if unusable else "PSS: an empty list of concepts")
        chosen = [index[c] for c in concepts]
    else:
        chosen = (stratified_sample(valid, [probe.concept_category[k] for k in valid], cfg.concepts, cfg.seed)
                  if cfg.concepts else valid)
    if control is None:
        control = control_set(probe, cfg.control_size, cfg.seed)
    else:
        control = sorted(set(int(i) for i in control))
        if not control or control[0] < 0 or control[-1] >= len(probe.questions):
            raise ValueError(f"PSS: control question indices must be a non-empty subset of 0..{len(probe.questions) - 1}"
                             f" (probe '{probe.name}'), got {len(control)} from {control[:1]} to {control[-1:]}")
    qidx_by_concept: Dict[int, List[int]] = {}
    for i, q in enumerate(probe.questions):
        qidx_by_concept.setdefault(probe.concept_index(q), []).append(i)

    # Unmasked accuracy of every question involved: CS_before, G_before.
    involved = sorted(set(control).union(*[qidx_by_concept[k] for k in chosen]))
    base = ms.correctness([(q, None) for q in involved], {None: None}, probe.questions)
    correct_before = {q: base[(q, None)] for q in involved}

    done = dict(done or {})
    rows: List[Dict[str, object]] = []
    layer_hist = {r: np.zeros(L) for r in cfg.ratios}
    from specext._progress import progress as tqdm

    mine = share(chosen) if share is not None else chosen
    todo = [k for k in mine if probe.concepts[k] not in done]
    kinds = ("top", "random") if cfg.random_control else ("top",)
    per_concept = sum(len(qidx_by_concept[k]) + len([q for q in control if q not in set(qidx_by_concept[k])])
                      for k in todo) * len(cfg.ratios) * len(kinds)
    bar = tqdm(total=per_concept, desc="PSS masked scoring", unit="row", disable=not progress)
    by_concept: Dict[str, List[dict]] = {}
    for k in mine:
        name = probe.concepts[k]
        own = qidx_by_concept[k]
        own_set = set(own)
        ctrl = [q for q in control if q not in own_set]
        masks: Dict[object, torch.Tensor] = {}
        tops = top_vectors_all(dscore(k), cfg.ratios, L, D, cfg.selection)
        for r in cfg.ratios:
            top = tops[r].cpu()  # host: index lists are small (at most the largest ratio's share)
            layer_hist[r] += np.bincount((top // D).cpu().numpy(), minlength=L)
            masks[("top", r)] = top
            if cfg.random_control:
                masks[("random", r)] = (random_like(top, L, D, _seed(cfg.seed, name, r)) if cfg.random_match == "layers"
                                        else random_vectors(r, L, D, cfg.selection, _seed(cfg.seed, name, r)))
        if name in done:
            by_concept[name] = done[name]
            continue
        jobs = [(q, key) for key in masks for q in own + ctrl]
        res = ms.correctness(jobs, masks, probe.questions, progress=bar.update)
        cs0 = float(np.mean([correct_before[q] for q in own]))
        g0 = float(np.mean([correct_before[q] for q in ctrl])) if ctrl else float("nan")
        denom = g0 if cfg.denominator == "general" else overall_accuracy
        crow = []
        for r in cfg.ratios:
            row = {"concept": name, "category": probe.categories[probe.concept_category[k]],
                   "tier": probe.concept_tier[k], "ratio": r, "n_vectors": int(masks[("top", r)].numel()),
                   "cs_before": cs0, "g_before": g0, "denominator": denom,
                   "pss_floor": pss_value(g0, cs0, denom)}
            for kind in kinds:
                cs = float(np.mean([res[(q, (kind, r))] for q in own]))
                g = float(np.mean([res[(q, (kind, r))] for q in ctrl])) if ctrl else float("nan")
                pre = "" if kind == "top" else "random_"
                row[pre + "cs"], row[pre + "g"] = cs, g
                row[pre + "pss"] = pss_value(g, cs, denom)
                row[pre + "pss_delta"] = pss_delta_value(g, cs, g0, cs0, denom)
                row[pre + "pss_delta_signed"] = pss_delta_signed_value(g, cs, g0, cs0, denom)
                row[pre + "pss_general"] = pss_value(g, cs, g0)
                row[pre + "pss_overall"] = pss_value(g, cs, overall_accuracy) if overall_accuracy is not None else None
            crow.append(row)
        by_concept[name] = crow
        if on_concept:
            on_concept(name, crow)
    bar.close()
    if gather is not None:
        parts = gather({"rows": by_concept, "hist": {r: h.tolist() for r, h in layer_hist.items()}})  # host: numpy
        by_concept = {n: v for p in parts for n, v in p["rows"].items()}
        layer_hist = {r: sum(np.asarray(p["hist"][r]) for p in parts) for r in cfg.ratios}
    for k in chosen:
        rows += by_concept[probe.concepts[k]]
    n_chosen = max(1, len(chosen))
    layer_counts = {r: (layer_hist[r] / n_chosen).tolist() for r in cfg.ratios}  # host: numpy arrays
    summary = summarize_pss(rows, cfg, len(chosen), len(control), overall_accuracy)
    # (an explicit list of concepts raised above instead; a --pss-concepts sample is drawn
    # from the usable ones, so a skipped concept could not be drawn: recorded either way)
    summary["skipped_concepts"] = skipped if concepts is None else []
    return PSSResult(rows=rows, summary=summary, layer_counts=layer_counts)


def _curve(rows, key, ratios):
    out = []
    for r in ratios:
        v = [x[key] for x in rows if x["ratio"] == r and x.get(key) is not None and not math.isnan(x[key])]
        out.append(float(np.mean(v)) if v else float("nan"))
    return out


def _matrix(rows, key, ratios) -> np.ndarray:
    """``(concepts, ratios)`` of ``key`` (NaN where missing), concepts in order of appearance."""
    concepts = list(dict.fromkeys(x["concept"] for x in rows))
    ci = {c: i for i, c in enumerate(concepts)}
    ri = {float(r): j for j, r in enumerate(ratios)}  # host: plain Python rows
    m = np.full((len(concepts), len(ratios)), np.nan)
    for x in rows:
        v = x.get(key)
        r = float(x["ratio"])  # host: plain Python rows
        if v is not None and r in ri:
            m[ci[x["concept"]], ri[r]] = v
    return m


def _scored(rows, key, ratios, n_boot, seed) -> Dict[str, object]:
    """Curve, intervals and peak of one score over concepts."""
    b = bootstrap.bootstrap_curve(_matrix(rows, key, ratios), n_boot, seed)
    pi = b["peak_index"]
    return {"curve": b["curve"], "curve_ci": b["curve_ci"], "peak": b["peak"],
            "peak_ratio": ratios[pi] if pi is not None else None, "peak_ci": b["peak_ci"]}


_SCORE_KEYS = {"paper": "pss", "delta": "pss_delta", "delta_signed": "pss_delta_signed"}
# every score summarised and written (SCORES: those that can be the headline)
REPORTED_SCORES = tuple(_SCORE_KEYS)


def _score_block(rows, score, ratios, cfg: PSSConfig, random_control: bool) -> Dict[str, object]:
    key = _SCORE_KEYS[score]
    seed = _seed(cfg.seed, "bootstrap", score)
    out = _scored(rows, key, ratios, cfg.bootstrap, seed)
    # a peak at the largest ratio tried is a lower bound: a larger ratio might score higher
    out["peak_at_largest_ratio"] = (len(ratios) > 1 and out["peak_ratio"] is not None
                                    and out["peak_ratio"] == max(ratios))
    if random_control:
        rnd = _scored(rows, "random_" + key, ratios, cfg.bootstrap, seed)
        out.update({"random_curve": rnd["curve"], "random_curve_ci": rnd["curve_ci"], "random_peak": rnd["peak"],
                    "random_peak_ci": rnd["peak_ci"]})
    else:
        out.update({"random_curve": None, "random_curve_ci": None, "random_peak": None, "random_peak_ci": None})
    return out


def summarize_pss(rows: List[dict], cfg: PSSConfig, n_concepts: int, n_control: int,
                  overall_accuracy: Optional[float]) -> Dict[str, object]:
    """Curves, peaks and 95% bootstrap intervals (over concepts) of both scores.

    The top-level ``curve``/``peak``/``peak_ci``/``random_curve``... are those of the score
    ``cfg.score`` (the headline); ``paper`` and ``delta`` hold both in full. ``floor`` is the
    paper score's value at ratio 0 (no mask), with its interval."""
    ratios = [float(r) for r in cfg.ratios]
    blocks = {sc: _score_block(rows, sc, ratios, cfg, cfg.random_control) for sc in REPORTED_SCORES}
    floor_rows = list({x["concept"]: x.get("pss_floor") for x in rows}.values())
    floor = bootstrap.bootstrap_mean([np.nan if v is None else v for v in floor_rows], cfg.bootstrap,
                                 _seed(cfg.seed, "bootstrap", "floor"))
    head = blocks[cfg.score]
    out = {
        "score": cfg.score,
        "ratios": ratios,
        **{k: head[k] for k in ("curve", "curve_ci", "peak", "peak_ci", "peak_ratio", "random_curve",
                                "random_curve_ci", "random_peak", "random_peak_ci")},
        "floor": floor["mean"],
        "floor_ci": floor["ci"],
        "paper": blocks["paper"],
        "delta": blocks["delta"],
        "delta_signed": blocks["delta_signed"],
        "peak_at_largest_ratio": head["peak_at_largest_ratio"],
        "curve_general": _curve(rows, "pss_general", ratios),
        "curve_overall": _curve(rows, "pss_overall", ratios) if overall_accuracy is not None else None,
        "cs_curve": _curve(rows, "cs", ratios),
        "g_curve": _curve(rows, "g", ratios),
        "cs_before": float(np.mean([x["cs_before"] for x in rows])) if rows else float("nan"),
        "g_before": float(np.nanmean([x["g_before"] for x in rows])) if rows else float("nan"),
        "overall_accuracy": overall_accuracy,
        "denominator": cfg.denominator,
        "unrelated": cfg.unrelated,
        "selection": cfg.selection,
        "random_match": cfg.random_match,
        "metric": cfg.metric,
        "concepts": n_concepts,
        "control_questions": n_control,
        "bootstrap": cfg.bootstrap,
        "ci_level": bootstrap.CI_LEVEL,
    }
    for group in ("tier", "category"):
        by = {}
        for g in sorted({str(x[group]) for x in rows if x[group] is not None}):
            sub = [x for x in rows if str(x[group]) == g]
            both = {sc: _scored(sub, "pss" if sc == "paper" else "pss_delta", ratios, cfg.bootstrap,
                                _seed(cfg.seed, "bootstrap", sc, group, g)) for sc in SCORES}
            by[g] = {**both[cfg.score], **both, "concepts": len({x["concept"] for x in sub})}
        out[f"by_{group}"] = by
    return out
