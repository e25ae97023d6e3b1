"""Probe accuracy: the mean of each correctness key over questions, overall and per concept,
category and frequency tier."""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def accuracy_by_group(rows: List[Dict[str, object]], keys=("mcq", "mcq_norm", "open")) -> Dict[str, object]:
    """Mean of each correctness key over all rows, per concept, per category and per tier.
    ``rows``: one dict per question with ``concept``, ``category``, ``tier`` and the keys."""
    def mean(rs, k):
        vals = [float(r[k]) for r in rs if r.get(k) is not None]  # host: plain Python rows
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
