"""scripts/reproduce_causal.py's statistics: Welch's test against scipy, and the verdicts."""

import math
from pathlib import Path

import pytest
from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
rc = load_script(ROOT / "scripts" / "reproduce_causal.py", "reproduce_causal")


def test_welch_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.5, 0.6, 0.55, 0.7], [0.3, 0.35, 0.5]
    w = rc.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert w["diff"] == pytest.approx(sum(a) / 4 - sum(b) / 3)


def test_welch_degenerate():
    assert rc.welch([1.0], [2.0])["p"] is None
    assert rc.welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    assert rc.welch([], [1.0])["diff"] is None
    # neither side varies and the means differ: no test (it used to say p = 0)
    w = rc.welch([0.0417] * 5, [0.0333] * 5)
    assert w["p"] is None and w["diff"] == pytest.approx(0.0084)


def test_holm_adjustment():
    ps = [0.01, 0.04, None, 0.03, 0.2, 0.001]
    got = rc.holm(ps)
    assert got[2] is None  # no test: not in the family
    # sorted: 0.001 (x5), 0.01 (x4), 0.03 (x3), 0.04 (x2), 0.2 (x1), running max, capped at 1
    assert got[5] == pytest.approx(0.005) and got[0] == pytest.approx(0.04) and got[3] == pytest.approx(0.09)
    assert got[1] == pytest.approx(0.09) and got[4] == pytest.approx(0.2)
    assert rc.holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_no_spread_difference_is_not_a_finding():
    comp = rc.comparisons(_results([0.0417] * 3, [0.0333] * 3))
    assert all(c["verdict"] == "no test (no spread over seeds)" and not c["beyond_spread"] for c in comp)


def _results(pv, other):
    runs = []
    for s in rc.STRATEGIES:
        vals = pv if s == "pv" else other
        runs += [{"strategy": s, "evaluation": {"table": {"trained_mcq": v, "trained_se": 1 - v}}} for v in vals]
    return {"metrics": [{"key": "trained_mcq", "label": "mcq"}, {"key": "trained_se", "label": "se"}], "runs": runs}


def test_verdicts_follow_the_better_direction():
    comp = rc.comparisons(_results([0.9, 0.92, 0.91], [0.5, 0.52, 0.49]))
    by = {(c["metric"], c["versus"]): c for c in comp}
    assert by[("trained_mcq", "FT-FV")]["verdict"] == "FT-PV better"
    assert by[("trained_se", "FT-RV")]["verdict"] == "FT-PV better"  # lower entropy is better
    comp = rc.comparisons(_results([0.5, 0.9, 0.1], [0.52, 0.1, 0.8]))
    assert all(c["verdict"] == "no clear difference" and not c["beyond_spread"] for c in comp)
    assert all(not math.isnan(c["pv_minus_other"]) for c in comp)


def test_unchanged_strategies_are_named():
    keys = ["trained_mcq", "trained_se"]
    row = lambda key, a, b, sd=0.0: {"key": key, "trained_mcq": a, "trained_mcq_std": sd, "trained_se": b,  # noqa: E731
                                     "trained_se_std": sd}
    res = {"metrics": [{"key": k, "label": k} for k in keys],
           "table": [row("original", 0.03, 0.93), row("fv", 0.29, 1.6, 0.01), row("pv", 0.033, 0.925, 0.002),
                     row("cv", 0.28, 1.6, 0.01), row("rv", 0.03, 0.932, 0.002)]}
    assert rc.unchanged(res) == ["FT-PV", "FT-RV"]


def test_comparison_csv_has_a_row_per_comparison():
    import csv
    import io

    comp = rc.comparisons(_results([0.9, 0.92, 0.91], [0.5, 0.52, 0.49]))
    rows = list(csv.reader(io.StringIO(rc.comparison_csv(comp))))
    assert rows[0] == list(rc.COMPARISON_COLUMNS) and len(rows) == 1 + len(comp)
    assert rows[1][rc.COMPARISON_COLUMNS.index("verdict")] == comp[0]["verdict"]
