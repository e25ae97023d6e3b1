"""Plain-torch implementations of the kernels in :mod:`specext.ops`.

They are the oracle in the tests (run in float64) and the baseline in the benchmarks
(run as a user would write them: float32 ``index_add_``, ``torch.sort`` +
``torch.special.entr``). Same arguments and semantics as the kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from specext.kernels.ops import STATS, NeuronStats


def apply_stat(x: torch.Tensor, stat: str) -> torch.Tensor:
    if stat == "abs":
        return x.abs()
    if stat == "square":
        return x * x
    if stat == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))  # NaN -> 0, as the kernels do
    if stat == "signed":
        return x
    raise ValueError(f"stat must be one of {STATS}, got {stat!r}")


def category_accumulate(
    acts: torch.Tensor,
    labels: torch.Tensor,
    num_categories: int,
    *,
    weights: Optional[torch.Tensor] = None,
    stat: str = "abs",
    sums: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
):
    """``sums[labels[t]] += w_t * stat(acts[t])`` with ``index_add_``, computed in ``dtype``."""
    labels = labels.to(torch.int64)
    if labels.numel() and int(labels.max()) >= num_categories:
        raise ValueError(f"labels must be < num_categories = {num_categories}")
    if sums is None:
        sums = torch.zeros((num_categories, acts.shape[1]), dtype=dtype, device=acts.device)
    if counts is None:
        counts = torch.zeros((num_categories,), dtype=dtype, device=acts.device)
    keep = labels >= 0
    lab = labels[keep]
    x = apply_stat(acts[keep].to(dtype), stat)
    w = weights[keep].to(dtype) if weights is not None else None
    if w is not None:
        x = x * w[:, None]
    sums.index_add_(0, lab, x.to(sums.dtype))
    counts.index_add_(0, lab, (w if w is not None else torch.ones_like(lab, dtype=dtype)).to(counts.dtype))
    return sums, counts


def neuron_specialization(mass: torch.Tensor, dtype: torch.dtype = torch.float64) -> NeuronStats:
    """Entropy, normalised entropy, Gini (via ``torch.sort``), top category, top share and
    total of each column of ``mass`` (C, N), computed in ``dtype``."""
    m = mass.to(dtype)
    C = m.shape[0]
    total = m.sum(0)
    valid = (m >= 0).all(0) & torch.isfinite(m).all(0) & (total > 0)
    p = m / torch.where(valid, total, torch.ones_like(total))
    entropy = torch.special.entr(p).sum(0).clamp_min(0)
    norm = entropy / math.log(C) if C > 1 else torch.zeros_like(entropy)
    s, _ = torch.sort(m, dim=0)
    i = torch.arange(1, C + 1, dtype=dtype, device=m.device)[:, None]
    gini = ((2 * i - C - 1) * s).sum(0) / (C * total)
    top_share, top = p.max(0)
    nan = torch.full_like(total, float("nan"))
    return NeuronStats(
        entropy=torch.where(valid, entropy, nan),
        norm_entropy=torch.where(valid, norm, nan),
        gini=torch.where(valid, gini, nan),
        top_category=torch.where(valid, top, torch.full_like(top, -1)),
        top_share=torch.where(valid, top_share, nan),
        total=total,
    )


def value_vector_norms(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """L2 norm of each column of ``weight`` (d_model, d_ff), computed in ``dtype``."""
    return torch.linalg.vector_norm(weight.to(dtype), dim=0)
