"""Pearson and Spearman correlation with two-sided p-values, without scipy.

:func:`pearson` and :func:`spearman` give the classical p-values: Student's t with n - 2
degrees of freedom (as ``scipy.stats.pearsonr``'s exact beta test, which is the same
distribution, and ``scipy.stats.spearmanr``): ``p = I_x(df/2, 1/2)`` with
``x = df / (df + t^2)``, the regularised incomplete beta function evaluated by its continued
fraction (Numerical Recipes 6.4).

:func:`pearson_test` and :func:`spearman_test` (what ``specext.compare`` reports) say which
method gave the p-value. For ``n <= EXACT_MAX_N`` it is the *exact permutation* p-value: the
share of all ``n!`` pairings of y with x whose correlation is at least as large in absolute
value as the observed one (the identity included, so never 0; ties are kept as they are:
the test is exact given them). The t distribution is poor there: at ``|rho| = 1`` it gives
``p = 0``, whereas with 3 points 2 of the 6 orderings reach ``|rho| = 1`` (p = 1/3). Beyond
``EXACT_MAX_N`` the t approximation is used, except for Spearman's ``|rho| = 1``, whose exact
permutation p-value is counted in closed form (the orderings that reproduce the ranks or
their reverse, ``2 / n!`` without ties).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence, Tuple

# n up to which p-values are exact permutation tests over all n! orderings (9! = 362880: a
# 3 MB table built once, ~0.1 s a test; 10! would be 3.6M rows and seconds each)
EXACT_MAX_N = 9
EXACT = "exact permutation"
T_APPROX = "t approximation"


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


class CorrelationTest(NamedTuple):
    """A correlation, its two-sided p-value and how the p-value was computed (``EXACT`` or
    ``T_APPROX``; None where the correlation is undefined)."""
    statistic: float
    pvalue: float
    method: Optional[str]


@lru_cache(maxsize=None)
def _permutations(n: int):
    """Every ordering of ``range(n)``: ``(n!, n)`` int8, read-only (cached)."""
    import itertools

    import numpy as np

    perms = np.array(list(itertools.permutations(range(n))), dtype=np.int8).reshape(-1, n)
    perms.setflags(write=False)
    return perms


def permutation_pvalue(x: Sequence[float], y: Sequence[float]) -> float:
    """Exact two-sided permutation p-value of the Pearson correlation of ``x`` and ``y``
    (``n = len(x) <= EXACT_MAX_N``, neither constant): the share of the ``n!`` orderings of
    ``y`` whose ``|r|`` is at least the observed one. Ties stay as they are (the test is
    conditional on them). For Spearman pass average ranks (:func:`rankdata`): with values in
    halves (ranks, small integers) every statistic is an integer and the count is exact;
    otherwise ``|r|`` within 1e-12 of the observed one counts as equal (rounding)."""
    import numpy as np

    n = len(x)
    if n != len(y):
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    if not 2 <= n <= EXACT_MAX_N:
        raise ValueError(f"an exact permutation test needs 2 to {EXACT_MAX_N} points, got {n}")
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = xa - xa.mean(), ya - ya.mean()
    norm = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if not norm > 0:
        raise ValueError("an exact permutation test needs x and y that are not constant")
    perms = _permutations(n)
    twice = np.concatenate([2 * xa, 2 * ya])
    if np.all(twice == np.round(twice)) and np.abs(twice).max() <= 2 ** 20:
        # halves: integer arithmetic, exact (|2n (x - mean x)| <= 2^25, sums of 9 products < 2^63)
        xi = (2 * n * xa - 2 * xa.sum()).round().astype(np.int64)  # 2n (x - mean x), an integer
        yi = (2 * n * ya - 2 * ya.sum()).round().astype(np.int64)
        stat = np.abs(yi[perms] @ xi)
        return float(np.count_nonzero(stat >= abs(int(yi @ xi))) / len(stat))
    r = np.abs(yc[perms] @ xc) / norm
    return float(np.count_nonzero(r >= abs(float(yc @ xc)) / norm - 1e-12) / len(r))


def _perfect_rank_pvalue(rx, ry) -> float:
    """Exact permutation p-value of ``|rho| = 1`` for any n, counted: the orderings of the
    ranks ``ry`` equal to ``rx`` (rho = 1) or to its reverse ``n + 1 - rx`` (rho = -1), each
    ``prod(tie size!)`` where ``ry``'s values are those of the target, over ``n!``."""
    from collections import Counter

    n = len(rx)
    cy = Counter(ry)
    ways = 1
    for c in cy.values():
        ways *= math.factorial(c)
    hits = sum(ways for target in (list(rx), [n + 1 - v for v in rx]) if Counter(target) == cy)
    return hits / math.factorial(n)


def pearson_test(x: Sequence[float], y: Sequence[float]) -> CorrelationTest:
    """Pearson r with its two-sided p-value: exact permutation for ``n <= EXACT_MAX_N`` (no
    normality assumed), otherwise the t test (exact for bivariate normal data; at
    ``|r| = 1`` its p is 0). NaN and method None for fewer than 3 points or a constant input."""
    r, p = pearson(x, y)
    if math.isnan(r):
        return CorrelationTest(r, p, None)
    if len(x) <= EXACT_MAX_N:
        return CorrelationTest(r, permutation_pvalue(x, y), EXACT)
    return CorrelationTest(r, p, T_APPROX)


def spearman_test(x: Sequence[float], y: Sequence[float]) -> CorrelationTest:
    """Spearman rho (Pearson on average ranks) with its two-sided p-value: exact permutation
    for ``n <= EXACT_MAX_N`` and at ``|rho| = 1`` (counted), otherwise the t approximation.
    Ties are handled by average ranks, and the exact test keeps them. NaN and method None
    for fewer than 3 points or a constant input."""
    rx, ry = rankdata(x), rankdata(y)
    rho, p = pearson(rx, ry)
    if math.isnan(rho):
        return CorrelationTest(rho, p, None)
    if len(rx) <= EXACT_MAX_N:
        return CorrelationTest(rho, permutation_pvalue(rx, ry), EXACT)
    if ry == rx or ry == [len(rx) + 1 - v for v in rx]:  # |rho| = 1, tested on the ranks, not rounding
        return CorrelationTest(rho, _perfect_rank_pvalue(rx, ry), EXACT)
    return CorrelationTest(rho, p, T_APPROX)
