"""Percentile bootstrap intervals: of a mean curve over concepts (PSS), of a mean, and of
correlations over runs (``specext.compare``). Seeded with ``numpy.random.default_rng``."""

from __future__ import annotations

import math
from typing import Sequence

from specext.metrics.correlation import pearson, spearman

CI_LEVEL = 0.95


def _percentile_ci(samples, level: float = CI_LEVEL):
    """Percentile interval ``[lo, hi]`` of bootstrap samples (NaN samples dropped); ``None``
    when no finite sample is left."""
    import numpy as np

    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a])
    return [float(lo), float(hi)]


def bootstrap_curve(values, n_boot: int, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """Mean curve over units (concepts) with bootstrap intervals, and its peak.

    ``values``: ``(K, R)`` array, one row per concept, one column per ratio (NaN = no value
    for that concept and ratio; left out of that column's mean). Concepts are resampled with
    replacement ``n_boot`` times (``numpy.random.default_rng(seed)``); every resample gives a
    whole curve, so the interval of the *peak* (the maximum over ratios of the mean curve)
    accounts for the choice of the peak ratio. Returns ``curve``, ``curve_ci`` (one
    ``[lo, hi]`` or ``None`` per ratio), ``peak``, ``peak_index`` (None when the curve has
    no finite point) and ``peak_ci``; with ``n_boot == 0`` every interval is ``None``.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be (units, points), got shape {v.shape}")
    K, R = v.shape
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        curve = np.nanmean(v, axis=0) if K else np.full(R, np.nan)
    finite = np.isfinite(curve)
    peak_index = int(np.nanargmax(curve)) if finite.any() else None
    peak = float(curve[peak_index]) if peak_index is not None else float("nan")
    out = {"curve": [float(x) for x in curve], "curve_ci": [None] * R, "peak": peak, "peak_index": peak_index,
           "peak_ci": None}
    if n_boot <= 0 or K == 0:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, K, size=(n_boot, K))
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        boot = np.nanmean(v[idx], axis=1)  # (n_boot, R)
        peaks = np.where(np.isfinite(boot).any(1), np.nanmax(np.where(np.isfinite(boot), boot, -np.inf), axis=1),
                         np.nan)
    out["curve_ci"] = [_percentile_ci(boot[:, r], level) for r in range(R)]
    out["peak_ci"] = _percentile_ci(peaks, level)
    return out


def bootstrap_mean(values, n_boot: int, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """``{"mean", "ci"}`` of a 1-D sample (NaN left out) with a bootstrap interval."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    b = bootstrap_curve(v, n_boot, seed, level)
    return {"mean": b["curve"][0] if len(v) else float("nan"), "ci": b["curve_ci"][0]}


def bootstrap_correlation(x: Sequence[float], y: Sequence[float], n_boot: int, seed: int = 0,
                          level: float = CI_LEVEL) -> dict:
    """Bootstrap intervals of Pearson r and Spearman rho over paired units (runs): pairs are
    resampled with replacement; resamples in which either variable is constant (r undefined)
    are dropped and counted. Returns ``pearson_ci``, ``spearman_ci``, ``resamples_used``."""
    import numpy as np

    n = len(x)
    if n != len(y):
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    if n < 3 or n_boot <= 0:
        return {"pearson_ci": None, "spearman_ci": None, "resamples_used": 0}
    rng = np.random.default_rng(seed)
    pr, sr = [], []
    for _ in range(n_boot):
        i = rng.integers(0, n, size=n)
        xs, ys = [x[j] for j in i], [y[j] for j in i]
        r, _ = pearson(xs, ys)
        if math.isnan(r):
            continue
        pr.append(r)
        sr.append(spearman(xs, ys)[0])
    return {"pearson_ci": _percentile_ci(pr, level), "spearman_ci": _percentile_ci(sr, level),
            "resamples_used": len(pr)}


class _quiet_nanmean:
    """Silences numpy's 'Mean of empty slice' warning (an all-NaN column is a NaN mean, by design)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
