"""Pearson and Spearman correlation with two-sided p-values, without scipy.

p-values use Student's t with n - 2 degrees of freedom (as ``scipy.stats.pearsonr``'s
exact beta test, which is the same distribution, and ``scipy.stats.spearmanr``):
``p = I_x(df/2, 1/2)`` with ``x = df / (df + t^2)``, the regularised incomplete beta
function evaluated by its continued fraction (Numerical Recipes 6.4).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _t_pvalue(r: float, n: int) -> float:
    df = n - 2
    if df <= 0:
        return float("nan")
    if abs(r) >= 1.0:
        return 0.0
    t2 = r * r * df / (1.0 - r * r)
    return betainc(0.5 * df, 0.5, df / (df + t2))


def pearson(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """(r, two-sided p). NaN for fewer than 3 points or a constant input."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    if n < 3:
        return float("nan"), float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return float("nan"), float("nan")
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)
    r = max(-1.0, min(1.0, r))
    return r, _t_pvalue(r, n)


def rankdata(x: Sequence[float]):
    """Average ranks (1-based), ties sharing their mean rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """(rho, two-sided p): Pearson on average ranks, p from the t distribution."""
    return pearson(rankdata(x), rankdata(y))
