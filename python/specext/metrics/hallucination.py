"""The paper's hallucination measures (issue 11): semantic entropy over sampled answers and
the local intrinsic dimension (LID) of hidden states.

- :func:`cluster_answers` / :func:`semantic_entropy`: discrete semantic entropy (Kuhn,
  Gal, Farquhar 2023; Farquhar et al. 2024, *Nature*): sample N answers to a question,
  group them into meaning clusters, and take the entropy (nats) of the cluster
  frequencies. Without an entailment model (none is available offline) meaning is
  approximated by the probe itself: every answer that :func:`specext.probes.scoring.
  open_answer_correct` accepts (the correct choice or an alias in the answer span) is one
  cluster, and the others cluster by exact equality of their normalised answer span. With
  ``nli`` (a bidirectional-entailment predicate, e.g. :func:`load_nli`) the remaining
  answers are clustered by the papers' greedy algorithm.
- :func:`lid_mle` / :func:`lid_mean`: the Levina-Bickel (2004) maximum-likelihood estimator
  of intrinsic dimension over the k nearest neighbours, as used for LLM truthfulness by
  Yin et al. (2024); distances are computed in float64 in bounded blocks.
- :func:`load_nli`: a local sequence-classification model as the entailment predicate
  (safetensors only, no remote code).

Choices and their reasons: ``docs/hallucination.md``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from specext.probes.probeset import Question
from specext.probes.scoring import _norm, answer_span, open_answer_correct

logger = logging.getLogger(__name__)

NLI = Callable[[str, str], bool]

# ---------------------------------------------------------------------------------------
# semantic entropy


def answer_key(text: str) -> str:
    """The normalised answer span of a generation (:func:`specext.probes.scoring.answer_span`,
    then the scorer's normalisation: casefolded, accents, punctuation and articles dropped):
    two answers with the same key are the same answer."""
    return _norm(answer_span(text))


def cluster_answers(answers: Sequence[str], question: Question, nli: Optional[NLI] = None) -> List[int]:
    """Meaning-cluster label of each answer, numbered 0, 1, ... in order of first appearance.

    1. Every answer that :func:`specext.probes.scoring.open_answer_correct` accepts for
       ``question`` (its correct choice or an alias in the answer span, the scorer's rule)
       joins one cluster, the correct one.
    2. Every other answer joins the cluster of an earlier answer with the same
       :func:`answer_key` (exact normalised equality).
    3. Otherwise, with ``nli`` (``nli(a, b)`` true when ``a`` and ``b`` entail each other),
       it joins the first cluster, in order of creation, whose first member it is
       equivalent to (Kuhn et al. 2023; Farquhar et al. 2024): the correct cluster's first
       member included, so a paraphrase of the answer that the string rule missed still
       joins it. Otherwise it starts a new cluster.

    ``nli`` is called on the answer spans (what the scorer matches), not on the raw
    generations, and only for answers that rules 1-2 leave unplaced; an empty answer span
    is its own meaning (all empty answers share one cluster, never passed to ``nli``).
    """
    labels: List[int] = []
    reps: List[str] = []  # each cluster's first member's answer span
    by_key: Dict[str, int] = {}
    correct_label: Optional[int] = None
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"answers must be strings, got {type(a).__name__}")
        span = answer_span(a)
        if open_answer_correct(a, question):
            if correct_label is None:
                correct_label = len(reps)
                reps.append(span)
            labels.append(correct_label)
            continue
        key = _norm(span)
        if key in by_key:
            labels.append(by_key[key])
            continue
        label = None
        if nli is not None and key:
            label = next((c for c, r in enumerate(reps) if r and bool(nli(r, span))), None)
        if label is None:
            label = len(reps)
            reps.append(span)
        by_key[key] = label
        labels.append(label)
    return labels


def entropy_of_labels(labels: Sequence[int]) -> float:
    """Entropy (nats) of the empirical distribution of ``labels``: ``-sum p ln p`` with
    ``p`` the share of each label."""
    if not labels:
        raise ValueError("entropy of no labels is undefined")
    n = len(labels)
    counts: Dict[int, int] = {}
    for x in labels:
        counts[x] = counts.get(x, 0) + 1
    h = -sum((c / n) * math.log(c / n) for c in counts.values())
    return max(0.0, h)  # -0.0 for a single cluster


def semantic_entropy(answers: Sequence[str], question: Question, nli: Optional[NLI] = None) -> float:
    """Discrete semantic entropy (nats) of ``answers`` to ``question``: the entropy of the
    frequencies of :func:`cluster_answers`' clusters (Farquhar et al. 2024's discrete
    variant, which needs no token probabilities). 0 when every answer means the same, ln N
    when N answers are all different."""
    if not answers:
        raise ValueError(f"semantic entropy needs at least one answer ({question.concept!r}: {question.question!r})")
    return entropy_of_labels(cluster_answers(answers, question, nli))


# ---------------------------------------------------------------------------------------
# local intrinsic dimension

_BLOCK_ELEMENTS = 1 << 23  # float64 entries of one distance block (64 MiB) and of one converted point block
_DUPLICATE_RTOL = 1e-12  # squared distance <= rtol * (|x|^2 + |y|^2): the same point (see lid_mle)


def knn_distances(points: torch.Tensor, k: int, *, block_elements: int = _BLOCK_ELEMENTS) -> torch.Tensor:
    """``(N, k)`` float64 distances from each point to its ``k`` nearest other points, in
    increasing order, computed in float64 on the points' device by blocks of about
    ``block_elements`` entries (rows x columns of the distance matrix, and rows x D of the
    converted points), so memory does not grow with ``N^2``. The point itself is never its
    own neighbour, nor are its exact duplicates (squared distance at most
    ``1e-12 * (|x|^2 + |y|^2)``: zero up to the rounding of ``|x|^2 + |y|^2 - 2 x.y``). A
    point with fewer than ``k`` distinct other points gets ``inf`` in the missing places."""
    if points.dim() != 2:
        raise ValueError(f"points must be (N, D), got shape {tuple(points.shape)}")
    N, D = points.shape
    if k < 1 or k >= N:
        raise ValueError(f"k must be in [1, N-1] = [1, {N - 1}] for {N} points, got {k}")
    if not points.is_floating_point():
        raise TypeError(f"points must be floating point, got {points.dtype}")
    if not bool(torch.isfinite(points).all()):  # host: one check per call
        raise ValueError("points contain NaN or inf")
    dev = points.device
    side = max(1, min(math.isqrt(block_elements), block_elements // max(1, D)))
    rows = min(N, side)
    cols = min(N, max(1, min(block_elements // rows, block_elements // max(1, D))))
    best = torch.empty((N, k), dtype=torch.float64, device=dev)
    sq_all = points.double().pow(2).sum(1) if N * D <= block_elements else torch.cat(
        [points[j:j + cols].double().pow(2).sum(1) for j in range(0, N, cols)])
    for i in range(0, N, rows):
        x = points[i:i + rows].double()
        r = x.shape[0]
        xs = sq_all[i:i + r]
        run = torch.full((r, k), math.inf, dtype=torch.float64, device=dev)
        for j in range(0, N, cols):
            y = points[j:j + cols].double()
            ys = sq_all[j:j + y.shape[0]]
            d2 = (xs[:, None] + ys[None, :] - 2.0 * (x @ y.T)).clamp_min_(0.0)
            dup = d2 <= _DUPLICATE_RTOL * (xs[:, None] + ys[None, :])
            ri = torch.arange(i, i + r, device=dev)[:, None]
            cj = torch.arange(j, j + y.shape[0], device=dev)[None, :]
            d2 = d2.masked_fill(dup | (ri == cj), math.inf)
            both = torch.cat([run, d2], 1)
            run = both.topk(k, dim=1, largest=False, sorted=True).values
        best[i:i + r] = run.sqrt()
    return best


def lid_mle(points: torch.Tensor, k: int = 20, *, block_elements: int = _BLOCK_ELEMENTS) -> torch.Tensor:
    """Levina-Bickel maximum-likelihood local intrinsic dimension of every point, ``(N,)``
    float64 on the points' device:

        LID(x) = [ 1/(k-1) * sum_{j=1}^{k-1} ln(T_k(x) / T_j(x)) ]^{-1}

    with ``T_j(x)`` the distance to the j-th nearest other point (:func:`knn_distances`;
    the ``k - 1`` normalisation is Levina and Bickel's maximum-likelihood estimate as
    published, their equation 8; normalising by ``k - 2`` instead would remove its upward
    bias of about ``(k - 1) / (k - 2)``, 12.5 % at k = 10; ``k >= 2``).

    Duplicates: a point's exact duplicates are not its neighbours (a zero ``T_j`` would make
    the estimate 0 whatever the geometry); duplicates therefore share one estimate, made
    from the distinct points around them. A point with fewer than ``k`` distinct others has
    no estimate (NaN, with a warning); a point whose ``k`` neighbours are all equidistant
    has ``inf`` (the likelihood has no maximum; :func:`lid_mean` handles it).
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 (the estimator averages over k - 1 distance ratios), got {k}")
    t = knn_distances(points, k, block_elements=block_elements)
    logs = torch.log(t[:, -1:] / t[:, :-1])  # (N, k-1), >= 0
    inv = logs.sum(1) / (k - 1)  # inverse LID
    lid = 1.0 / inv  # inf when every T_j == T_k
    short = ~torch.isfinite(t[:, -1])
    n_short = int(short.sum())  # host: one count per call
    if n_short:
        logger.warning("LID: %d of %d points have fewer than k=%d distinct other points; their estimate is NaN",
                       n_short, points.shape[0], k)
        lid = lid.masked_fill(short, math.nan)
    return lid


def lid_mean(points: torch.Tensor, k: int = 20, *, block_elements: int = _BLOCK_ELEMENTS) -> float:
    """One intrinsic dimension for the whole point set: the MacKay-Ghahramani (2005)
    aggregate, the inverse of the mean *inverse* per-point estimate,
    ``1 / mean_x(1 / LID(x))``, over the points with an estimate.

    Why not the mean of the per-point estimates: each is the inverse of a mean of k - 1
    log-ratios, so it is right-skewed and biased upward (and infinite for equidistant
    neighbours); MacKay and Ghahramani showed that pooling the log-ratios, i.e. averaging
    the inverses, is the maximum-likelihood estimate of a dimension shared by the points.
    """
    lid = lid_mle(points, k, block_elements=block_elements)
    inv = 1.0 / lid[~torch.isnan(lid)]
    if inv.numel() == 0:
        raise ValueError("no point has an LID estimate (every point has fewer than k distinct neighbours)")
    m = inv.mean()
    return math.inf if m.item() == 0.0 else (1.0 / m).item()  # host: one number per call


# ---------------------------------------------------------------------------------------
# an entailment model


class NLIPredicate:
    """Bidirectional entailment with a local sequence-classification model: ``pred(a, b)``
    is True when the model's argmax label is the entailment label both for the premise
    ``a`` with hypothesis ``b`` and for ``b`` with ``a`` (one batched forward of the two
    pairs). Results are cached per unordered pair; :attr:`calls` counts forward passes."""

    def __init__(self, model, tokenizer, entail_index: int, device: torch.device, max_length: int = 256):
        self.model, self.tokenizer, self.entail_index = model, tokenizer, int(entail_index)
        self.device, self.max_length = device, max_length
        self.calls = 0
        self._cache: Dict[Tuple[str, str], bool] = {}

    @torch.inference_mode()
    def __call__(self, a: str, b: str) -> bool:
        key = (a, b) if a <= b else (b, a)
        if key in self._cache:
            return self._cache[key]
        enc = self.tokenizer([a, b], [b, a], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        enc = {n: v.to(self.device) for n, v in enc.items()}
        logits = self.model(**enc).logits  # (2, n_labels)
        both = bool((logits.argmax(-1) == self.entail_index).all())  # host: one answer pair per call
        self.calls += 1
        self._cache[key] = both
        return both


def entailment_label(id2label: Dict[int, str], where: str = "config.json") -> int:
    """Index of the label whose name contains "entail" (case-insensitive; "not_entailment"
    and "non-entailment" excluded); ``ValueError`` when there is none or more than one."""
    hits = [int(i) for i, name in id2label.items()
            if "entail" in str(name).lower() and not str(name).lower().replace("-", "_").startswith(("not_", "non_"))]
    if len(hits) != 1:
        raise ValueError(f"{where}: expected exactly one entailment label (a name containing 'entail') in id2label, "
                         f"got {dict(id2label)}; an NLI model (e.g. an MNLI classifier) is needed")
    return hits[0]


def load_nli(model_dir: Union[str, Path], device: str = "cpu", dtype: str = "float32") -> NLIPredicate:
    """A bidirectional-entailment predicate from a local ``AutoModelForSequenceClassification``
    directory (config.json, ``*.safetensors``, a tokenizer): safetensors only, no remote code,
    no download. Its ``config.id2label`` must name exactly one entailment label (see
    :func:`entailment_label`); otherwise ``ValueError``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"NLI model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json (expected a Hugging Face sequence-classification model)")
    if not any(p.suffix == ".safetensors" for p in model_dir.iterdir()):
        raise ValueError(f"{model_dir}: no *.safetensors weights; specext loads safetensors only (unpickling can "
                         "run arbitrary code): convert the checkpoint first")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("id2label")
    if not raw:
        raise ValueError(f"{model_dir}/config.json: no id2label; cannot tell which output is entailment")
    idx = entailment_label({int(i): n for i, n in cfg.id2label.items()}, f"{model_dir}/config.json")
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=False, use_safetensors=True,
        dtype=getattr(torch, dtype))
    dev = torch.device(device)
    model.to(dev).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    logger.info("NLI model %s: entailment label %d (%s) of %d", model_dir, idx, cfg.id2label[idx], cfg.num_labels)
    return NLIPredicate(model, tok, idx, dev)
