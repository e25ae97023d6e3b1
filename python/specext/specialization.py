"""Concept and category mass -> per-neuron entropy and Gini, per-layer and model aggregates.

Definitions (DESIGN.md §1): the prompt-level statistic of neuron ``n`` is the mean of
``|m_n|`` over the prompt's selected tokens; the *mass* ``M[c, n]`` of category ``c`` is
the mean of that statistic over the category's prompts, so each prompt counts once. Only
concept sums are accumulated: a category's mass is the count-weighted mean of its
concepts'. With ``stat="contribution"`` the mass of neuron ``(l, n)`` is multiplied by
``||v_(l, n)||``, the norm of its value vector; per-neuron entropy and Gini are invariant
to that scale (it matters for totals and for ranking vectors across neurons).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import ops

logger = logging.getLogger(__name__)

GINI_THRESHOLDS = (0.1, 0.3, 0.5)


class ConceptMass:
    """Running sums of prompt statistics per concept: ``sums (K, L, d_ff)``, ``counts (K, L)``.

    A prompt whose statistic at layer ``l`` is not finite (NaN/inf activations) is left
    out of that layer's sums and counts and counted in ``nonfinite[l]``: reported, never
    averaged in.
    """

    def __init__(self, n_concepts: int, n_layers: int, d_ff: int, device="cpu"):
        self.sums = torch.zeros((n_concepts, n_layers, d_ff), dtype=torch.float32, device=device)
        self.counts = torch.zeros((n_concepts, n_layers), dtype=torch.float32, device=device)
        self.nonfinite = torch.zeros((n_layers,), dtype=torch.int64, device=device)

    def add(self, concept_idx: torch.Tensor, prompt_stats: torch.Tensor) -> None:
        """Fold a batch of prompt statistics ``(B, L, d_ff)`` into the concepts ``concept_idx (B,)``."""
        ok = torch.isfinite(prompt_stats).all(-1)  # (B, L)
        stats = torch.where(ok[..., None], prompt_stats, torch.zeros_like(prompt_stats))
        idx = concept_idx.to(self.sums.device)
        self.sums.index_add_(0, idx, stats.to(self.sums.device))
        self.counts.index_add_(0, idx, ok.float().to(self.counts.device))
        self.nonfinite += (~ok).sum(0).to(self.nonfinite.device)

    def state(self) -> Dict[str, torch.Tensor]:
        return {"sums": self.sums, "counts": self.counts, "nonfinite": self.nonfinite}

    def load_state(self, st: Dict[str, torch.Tensor]) -> None:
        for k, v in st.items():
            getattr(self, k).copy_(v)

    def concept_mass(self) -> torch.Tensor:
        """``(K, L, d_ff)`` mean statistic per concept (NaN where a concept has no prompt)."""
        return self.sums / self.counts[..., None]

    def category_mass(self, concept_category: Sequence[int], n_categories: int) -> torch.Tensor:
        """``(C, L, d_ff)``: each category's prompt-weighted mean over its concepts."""
        cat = torch.as_tensor(list(concept_category), dtype=torch.long, device=self.sums.device)
        sums = torch.zeros((n_categories,) + tuple(self.sums.shape[1:]), dtype=torch.float64, device=self.sums.device)
        sums.index_add_(0, cat, self.sums.double())
        counts = torch.zeros((n_categories, self.sums.shape[1]), dtype=torch.float64, device=self.sums.device)
        counts.index_add_(0, cat, self.counts.double())
        return (sums / counts[..., None]).float()


@dataclass
class NeuronTable:
    """Per-neuron results, each ``(L, d_ff)``."""

    gini: torch.Tensor
    entropy: torch.Tensor
    norm_entropy: torch.Tensor
    top_category: torch.Tensor
    top_share: torch.Tensor
    total: torch.Tensor

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous().cpu() for k in
                ("gini", "entropy", "norm_entropy", "top_category", "top_share", "total")}


def neuron_table(category_mass: torch.Tensor, value_norms: Optional[torch.Tensor] = None) -> NeuronTable:
    """Per-neuron statistics over categories from ``category_mass (C, L, d_ff)``; optional
    ``value_norms (L, d_ff)`` scale the mass (``stat="contribution"``)."""
    C, L, D = category_mass.shape
    m = category_mass
    if value_norms is not None:
        m = m * value_norms.to(m.device)[None]
    st = ops.neuron_specialization(m.reshape(C, L * D).float().contiguous())
    return NeuronTable(**{k: v.reshape(L, D) for k, v in st._asdict().items()})


def _agg(g: torch.Tensor, h: torch.Tensor, dead: torch.Tensor) -> Dict[str, float]:
    live = ~dead
    gl, hl = g[live].double(), h[live].double()
    out: Dict[str, float] = {
        "neurons": int(g.numel()),
        "dead": int(dead.sum()),
        "mean_gini": float(gl.mean()) if gl.numel() else float("nan"),
        "median_gini": float(gl.median()) if gl.numel() else float("nan"),
        "mean_norm_entropy": float(hl.mean()) if hl.numel() else float("nan"),
    }
    for t in GINI_THRESHOLDS:
        out[f"share_gini_above_{t}"] = float((gl > t).double().mean()) if gl.numel() else float("nan")
    return out


def summarize(table: NeuronTable) -> Dict[str, object]:
    """Model-level and per-layer aggregates over live neurons (dead/invalid ones counted)."""
    dead = table.gini.isnan()
    model = _agg(table.gini, table.norm_entropy, dead)
    layers = []
    for l in range(table.gini.shape[0]):
        d = _agg(table.gini[l], table.norm_entropy[l], dead[l])
        d["layer"] = l
        layers.append(d)
    return {"neurons": model, "layers": layers}


def accuracy_breakdown(rows: List[Dict[str, object]], keys=("mcq", "mcq_norm", "open")) -> Dict[str, object]:
    """Mean of each correctness key over all rows, per concept, per category and per tier.
    ``rows``: one dict per question with ``concept``, ``category``, ``tier`` and the keys."""
    def mean(rs, k):
        vals = [float(r[k]) for r in rs if r.get(k) is not None]
        return float(np.mean(vals)) if vals else None

    out: Dict[str, object] = {k: mean(rows, k) for k in keys}
    for group in ("category", "tier", "concept"):
        by: Dict[str, List] = {}
        for r in rows:
            g = r.get(group)
            if g is not None:
                by.setdefault(str(g), []).append(r)
        out[f"by_{group}"] = {g: {k: mean(rs, k) for k in keys} | {"questions": len(rs)} for g, rs in by.items()}
    return out
