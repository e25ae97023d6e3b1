"""python -m specext.compare: strict JSON with reasons, run labels, differing settings, the
formatting of its tables, compare.html in a real browser (issue 12); one model counted once
(the same directory or the same weights is an error unless --allow-duplicate-models) and
exact permutation p-values for few runs, against brute force and scipy."""

import hashlib
import itertools
import json
import logging
import math
import os
import shutil

import numpy as np
import pytest

import browser
from specext.compare import compare, fmt_count, fmt_num, main, run_labels
from specext.metrics import correlation


def write_run(d, acc=0.6, pss=0.1, gini=0.2, questions=100, pss_concepts=24, ratios=(0.1, 1.0, 10.0), model="m",
              probe="world", config=True, weights=None, stat="abs"):
    """A finished run directory; its config.json's fingerprint has a weights hash of its own
    (from its path) unless ``weights`` names another run's path (the same weights as that run)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({
        "model": f"/models/{model}", "architecture": "LlamaForCausalLM", "parameters": 1_102_080,
        "accuracy": {"mcq": acc, "mcq_norm": acc, "open": 0.1},
        "pss": {"score": "paper", "peak": pss, "peak_ratio": 1.0, "floor": 0.01, "ratios": list(ratios),
                "concepts": pss_concepts, "control_questions": 200, "unrelated": "other", "selection": "global",
                "denominator": "overall", "metric": "mcq",
                "paper": {"peak": pss, "peak_ratio": 1.0, "peak_ci": [pss - 0.01, pss + 0.02]},
                "delta": {"peak": pss / 2, "peak_ratio": 2.0, "peak_ci": [pss / 2 - 0.01, pss / 2 + 0.01]}},
        "neurons": {"mean_gini": gini, "mean_norm_entropy": 0.9, "mean_gini_null": 0.05,
                    "mean_excess_gini": gini - 0.05, "share_above_null": 0.5},
        "probe": {"name": probe, "questions": questions, "concepts": 10}, "positions": "question"}))
    if config:
        w = hashlib.sha256(f"weights of {weights or d}".encode()).hexdigest()
        (d / "config.json").write_text(json.dumps({"options": {"stat": stat}, "fingerprint": {
            "options": {"probe": probe, "stat": stat, "seed": 0}, "model_config_sha256": "c" * 64,
            "weights_sha256": w, "probe_sha256": hashlib.sha256(probe.encode()).hexdigest(), "questions": questions}}))
    return str(d)


def _no_nan(s):
    raise ValueError(f"non-strict JSON constant {s}")


def strict_load(path):
    """compare.json through a strict parser: bare NaN / Infinity are an error."""
    return json.loads(path.read_text(), parse_constant=_no_nan)


def test_two_runs_give_null_correlations_with_a_reason(tmp_path, capsys):
    dirs = [write_run(tmp_path / "a", acc=0.5), write_run(tmp_path / "b", acc=0.7, pss=0.2)]
    assert main(dirs + ["--out", str(tmp_path / "cmp")]) == 0
    res = strict_load(tmp_path / "cmp" / "compare.json")
    for v in res["correlations"].values():
        assert v["n"] == 2 and v["pearson"] is None and v["spearman_p"] is None and v["pearson_ci"] is None
        assert v["reason"].startswith("fewer than 3 runs")
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "no correlation: fewer than 3 runs with both peak_pss and mcq accuracy (2)" in out
    assert "fewer than 3 runs" in (tmp_path / "cmp" / "compare.html").read_text()


def test_constant_accuracy_and_nan_values_are_null_in_strict_json(tmp_path, capsys):
    dirs = [write_run(tmp_path / f"r{i}", acc=1.0, pss=0.1 * (i + 1)) for i in range(3)]
    s = json.loads((tmp_path / "r0" / "summary.json").read_text())
    s["neurons"]["mean_gini"] = float("nan")  # as a run with only dead neurons writes it (a bare NaN)
    (tmp_path / "r0" / "summary.json").write_text(json.dumps(s))
    assert main(dirs + ["--out", str(tmp_path / "cmp")]) == 0
    res = strict_load(tmp_path / "cmp" / "compare.json")
    c = res["correlations"]["peak_pss_vs_mcq"]
    assert c["n"] == 3 and c["pearson"] is None and c["reason"] == "constant accuracy: mcq is 1.0000 in every run"
    assert res["correlations"]["mean_gini_vs_mcq"]["n"] == 2
    assert res["runs"][0]["mean_gini"] is None and res["runs"][1]["mean_gini"] == 0.2
    assert "pearson nan" not in capsys.readouterr().out
    # a constant metric is named as such
    dirs = [write_run(tmp_path / f"s{i}", acc=0.5 + 0.1 * i, pss=0.1) for i in range(3)]
    res = compare(dirs, tmp_path / "cmp2", bootstrap=0)
    assert res["correlations"]["peak_pss_vs_mcq"]["reason"] == "constant peak_pss: 0.1000 in every run"
    assert res["correlations"]["mean_gini_vs_mcq"]["reason"] == "constant mean_gini: 0.2000 in every run"


def test_defined_correlations_have_no_reason(tmp_path):
    dirs = [write_run(tmp_path / f"r{i}", acc=0.3 + 0.1 * i, pss=0.05 * (i + 1) ** 1.5, gini=0.1 + 0.03 * i * i)
            for i in range(4)]
    res = compare(dirs, tmp_path / "cmp", bootstrap=50)
    c = res["correlations"]["peak_pss_vs_mcq"]
    assert c["reason"] is None and 0.9 < c["pearson"] <= 1 and c["spearman"] == pytest.approx(1.0)
    assert strict_load(tmp_path / "cmp" / "compare.json")["correlations"]["peak_pss_vs_mcq"]["reason"] is None


def test_runs_are_labelled_by_directory(tmp_path):
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert run_labels([str(tmp_path / "alpha"), str(tmp_path / "beta")]) == ["alpha", "beta"]
    assert run_labels([str(a), str(b), str(a)]) == ["x/run", "y/run", "x/run (2)"]
    assert run_labels([str(a), str(tmp_path / "q" / "x" / "run")]) == [f"{tmp_path.name}/x/run", "q/x/run"]
    # the same model in every run: the label is the directory, not the model
    dirs = [write_run(a, acc=0.5), write_run(b, acc=0.6), write_run(tmp_path / "z", acc=0.7)]
    res = compare(dirs, tmp_path / "cmp", bootstrap=0)
    assert [r["label"] for r in res["runs"]] == ["x/run", "y/run", "z"]
    csv = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("label,run,model,") and [l.split(",")[0] for l in csv[1:]] == ["x/run", "y/run", "z"]
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "<td>x/run</td>" in page and "<td>y/run</td>" in page


def test_table_formatting():
    assert [fmt_count(n) for n in (1_102_080, 7_241_732_096, 124_439_808, 70_553_706_496, 950, None)] == [
        "1.1M", "7.2B", "124M", "70.6B", "950", "n/a"]
    assert fmt_num(1) == "1.0000" and fmt_num(0.21212) == "0.2121" and fmt_num(float("nan")) == "n/a"


def test_differing_settings_are_warned_and_recorded(tmp_path, caplog):
    dirs = [write_run(tmp_path / "a", acc=0.5), write_run(tmp_path / "b", acc=0.6, questions=80, pss_concepts=8),
            write_run(tmp_path / "c", acc=0.7, ratios=(1.0, 5.0))]
    with caplog.at_level(logging.WARNING, logger="specext.compare"):
        res = compare(dirs, tmp_path / "cmp", bootstrap=0)
    diff = res["differing_settings"]
    assert set(diff) == {"questions", "pss_concepts", "pss_ratios"}
    assert diff["questions"] == {"a": 100, "b": 80, "c": 100} and diff["pss_ratios"]["c"] == [1.0, 5.0]
    assert len(res["warnings"]) == 3 and "the runs differ in questions (a: 100; b: 80; c: 100)" in caplog.text
    assert strict_load(tmp_path / "cmp" / "compare.json")["differing_settings"] == diff
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "The runs differ in questions, pss_ratios, pss_concepts" in page and "1, 5" in page
    # the same settings everywhere: no warning, the settings listed once
    dirs = [write_run(tmp_path / f"s{i}", acc=0.5 + 0.1 * i) for i in range(3)]
    res = compare(dirs, tmp_path / "cmp2", bootstrap=0)
    assert res["differing_settings"] == {} and res["warnings"] == []
    page = (tmp_path / "cmp2" / "compare.html").read_text()
    assert "The runs differ" not in page and "Settings common to every run: probe <b>world</b>" in page
    # a run without PSS, and one without config.json
    s = json.loads((tmp_path / "s2" / "summary.json").read_text())
    s["pss"] = None
    (tmp_path / "s2" / "summary.json").write_text(json.dumps(s))
    (tmp_path / "s1" / "config.json").unlink()
    res = compare(dirs, tmp_path / "cmp3", bootstrap=0)
    assert res["differing_settings"]["pss"] == {"s0": None, "s1": None, "s2": "off"}
    assert res["differing_settings"]["stat"] == {"s0": "abs", "s1": None, "s2": "abs"}


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.SKIP_REASON)
def test_compare_html_in_a_browser(tmp_path):
    """compare.html in headless Chromium: the scatter plot loads and nothing is wider than
    the window at 1700 px (the runs table once reached 4000 px) or at 1000 px."""
    dirs = [write_run(tmp_path / f"a-rather-long-run-directory-name-{i}" / "run", acc=0.4 + 0.1 * i, pss=0.03 * i + 0.01,
                      gini=0.15 + 0.01 * i, model=f"Qwen1.5-{i}B-Chat", pss_concepts=24 + (i == 2))
            for i in range(5)]
    out = tmp_path / "cmp"
    assert main(dirs + ["--out", str(out)]) == 0
    for width in (1700, 1000):
        seen = browser.check_page(out / "compare.html", width)
        assert seen["images"] == 1 and seen["broken"] == [], seen
        assert seen["scroll_width"] <= seen["window_width"] == width, seen
    png = browser.screenshot(out / "compare.html", tmp_path / "compare.png", 1700, 1400)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# ---------------------------------------------------------------------------- one model, one point


def _three(tmp_path):
    return [write_run(tmp_path / n, acc=0.5 + 0.1 * i, pss=0.1 * (i + 1), gini=0.1 + 0.05 * i)
            for i, n in enumerate("ABC")]


def test_the_same_run_directory_twice_is_an_error(tmp_path, capsys, caplog):
    a, b, c = _three(tmp_path)
    with pytest.raises(ValueError, match=r"same model would count more than once.*"
                                         rf"{c} is given 3 times.*--allow-duplicate-models"):
        compare([a, b, c, c, c], tmp_path / "cmp", bootstrap=0)
    assert not (tmp_path / "cmp").exists()  # nothing written
    # through a link, or spelled differently: the same resolved path
    os.symlink(c, tmp_path / "link")
    assert main([a, b, c, str(tmp_path / "link"), "--out", str(tmp_path / "cmp"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{c} is given 2 times (as {c}, {tmp_path / 'link'}, all {c})" in err and "Traceback" not in err
    # on request: counted, with a warning in compare.json, compare.html and the log
    with caplog.at_level(logging.WARNING, logger="specext.compare"):
        assert main([a, b, c, c, c, "--out", str(tmp_path / "cmp"), "--bootstrap", "0",
                     "--allow-duplicate-models"]) == 0
    res = strict_load(tmp_path / "cmp" / "compare.json")
    assert res["correlations"]["peak_pss_vs_mcq"]["n"] == 5 and len(res["warnings"]) == 1
    w = res["warnings"][0]
    assert w.startswith(f"{c} is given 3 times: counted as separate models (--allow-duplicate-models)")
    assert w in caplog.text
    assert "is given 3 times: counted as separate models" in (tmp_path / "cmp" / "compare.html").read_text()


def test_a_copied_run_or_the_same_weights_is_an_error(tmp_path, capsys):
    a, b, c = _three(tmp_path)
    d = str(tmp_path / "copy-of-C")
    shutil.copytree(c, d)  # cp -a: another path, the same config.json
    assert main([a, b, c, d, "--out", str(tmp_path / "cmp"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    w = json.loads((tmp_path / "C" / "config.json").read_text())["fingerprint"]["weights_sha256"]
    assert (f"{c}, {d} analysed the same model weights (weights_sha256 {w[:16]}..., model /models/m) with the same "
            "probe and options too (copies of one run)") in err
    # the same weights with another probe and --stat, under another model path: still one model
    e = write_run(tmp_path / "E", acc=0.9, pss=0.5, model="m-elsewhere", probe="specwiki", weights=a, stat="square")
    with pytest.raises(ValueError, match=rf"{a}, {e} analysed the same model weights \(weights_sha256 [0-9a-f]{{16}}"
                                         r"\.\.\., model /models/m / /models/m-elsewhere\) \(they differ only in "
                                         r"options.probe, options.stat, probe_sha256: still one model\)"):
        compare([a, b, c, e], tmp_path / "cmp", bootstrap=0)
    # both groups named in one error
    with pytest.raises(ValueError, match=rf"{c}, {d} analysed.*; {a}, {e} analysed|{a}, {e} analysed.*; {c}, {d}"):
        compare([a, b, c, d, e], tmp_path / "cmp", bootstrap=0)
    res = compare([a, b, c, d, e], tmp_path / "cmp", bootstrap=0, allow_duplicate_models=True)
    assert res["correlations"]["peak_pss_vs_mcq"]["n"] == 5 and len(res["warnings"]) == 2 + 2  # + probe, stat differ
    assert sum("counted as separate models" in w for w in res["warnings"]) == 2
    # the same model path with other weights (a fine-tune written in place) is another model
    f = write_run(tmp_path / "F", acc=0.3, pss=0.3)
    res = compare([a, b, c, f], tmp_path / "cmp", bootstrap=0)
    assert res["warnings"] == [] and res["correlations"]["peak_pss_vs_mcq"]["n"] == 4
    assert res["runs"][0]["weights_sha256"] != res["runs"][3]["weights_sha256"]


def test_runs_without_a_weights_hash_are_checked_by_path_with_a_warning(tmp_path):
    a, b, c = _three(tmp_path)
    (tmp_path / "B" / "config.json").write_text(json.dumps({"options": {"stat": "abs"}}))  # an older specext's
    res = compare([a, b, c], tmp_path / "cmp", bootstrap=0)
    assert res["warnings"] == [f"{b}: no fingerprint.weights_sha256 in config.json (not written by specext.analyze, "
                               "or by an older version): whether another run analysed the same model weights was not "
                               "checked (only the directories' paths were)"]
    assert res["runs"][1]["weights_sha256"] is None
    with pytest.raises(ValueError, match=rf"{b} is given 2 times"):
        compare([a, b, c, b], tmp_path / "cmp", bootstrap=0)
    assert compare([a], tmp_path / "cmp1", bootstrap=0)["warnings"] == []  # one run: nothing to tell apart


# ---------------------------------------------------------------------------- p-values for few runs


def _brute_p(x, y):
    """Two-sided permutation p by definition: the share of the n! orderings of y with |r| >= observed."""
    def r(a, b):
        a, b = np.asarray(a, float) - np.mean(a), np.asarray(b, float) - np.mean(b)
        return float(a @ b / math.sqrt((a @ a) * (b @ b)))
    obs = abs(r(x, y))
    hits = sum(abs(r(x, [y[i] for i in p])) >= obs - 1e-12 for p in itertools.permutations(range(len(x))))
    return hits / math.factorial(len(x))


def test_three_runs_with_rho_one_have_p_one_third(tmp_path, capsys):
    """The audit's case: rho = 1 over 3 runs printed p = 0; 2 of the 3! orderings reach |rho| = 1."""
    a, b, c = _three(tmp_path)
    assert main([a, b, c, "--out", str(tmp_path / "cmp"), "--bootstrap", "0"]) == 0
    res = strict_load(tmp_path / "cmp" / "compare.json")
    for v in res["correlations"].values():
        assert v["n"] == 3 and v["spearman"] == pytest.approx(1.0) and v["pearson"] == pytest.approx(1.0)
        assert v["spearman_p"] == pytest.approx(1 / 3) and v["pearson_p"] == pytest.approx(1 / 3)
        assert v["spearman_p_method"] == v["pearson_p_method"] == "exact permutation"
    assert "spearman 1.0000 (p=0.333, exact permutation)" in capsys.readouterr().out
    assert "0.333 (exact)" in (tmp_path / "cmp" / "compare.html").read_text()
    # undefined: no method either
    res = compare([a, b], tmp_path / "cmp2", bootstrap=0)
    assert res["correlations"]["peak_pss_vs_mcq"]["spearman_p_method"] is None


def test_many_runs_use_the_t_approximation(tmp_path):
    rng = np.random.default_rng(5)
    n = correlation.EXACT_MAX_N + 3
    dirs = [write_run(tmp_path / f"r{i}", acc=float(rng.uniform(0.3, 0.9)), pss=float(rng.uniform(0.01, 0.2)),
                      gini=0.1 + 0.01 * i) for i in range(n)]
    res = compare(dirs, tmp_path / "cmp", bootstrap=0)
    c = res["correlations"]["peak_pss_vs_mcq"]
    assert c["n"] == n and c["pearson_p_method"] == c["spearman_p_method"] == "t approximation"
    x, y = [r["peak_pss"] for r in res["runs"]], [r["mcq"] for r in res["runs"]]
    assert c["spearman_p"] == pytest.approx(correlation.spearman(x, y)[1], rel=1e-12)
    assert 0 < c["spearman_p"] < 1 and 0 < c["pearson_p"] < 1


def test_exact_pvalues_match_brute_force_with_and_without_ties():
    rng = np.random.default_rng(11)
    for n in range(3, correlation.EXACT_MAX_N + 1):
        for ties in (False, True):
            x = rng.normal(size=n)
            y = 0.6 * x + rng.normal(size=n)
            if ties:
                x[1] = x[0]
                y[2] = y[0]
            x, y = list(x), list(y)
            pr, pp, pm = correlation.pearson_test(x, y)
            sr, sp, sm = correlation.spearman_test(x, y)
            assert pm == sm == "exact permutation"
            if n <= 7:  # 8! and 9! orderings by Python loops: too slow for a test
                assert pp == pytest.approx(_brute_p(x, y), abs=1e-12), (n, ties)
                rx, ry = correlation.rankdata(x), correlation.rankdata(y)
                assert sp == pytest.approx(_brute_p(rx, ry), abs=1e-12), (n, ties)
            assert 0 < sp <= 1 and 0 < pp <= 1 and pr == pytest.approx(correlation.pearson(x, y)[0])
    # the smallest p reachable: 2 of n! orderings at |rho| = 1 without ties, at any n
    for n in (3, 5, correlation.EXACT_MAX_N, correlation.EXACT_MAX_N + 1, 12):
        r = correlation.spearman_test(list(range(n)), [v ** 3 for v in range(n)])
        assert r.statistic == 1.0 and r.pvalue == pytest.approx(2 / math.factorial(n), rel=1e-12)
        assert r.method == "exact permutation"
        assert correlation.spearman_test(list(range(n)), [-v for v in range(n)]).pvalue == pytest.approx(
            2 / math.factorial(n), rel=1e-12)
    # rho = 1 with ties (12 points, a tied pair at each end in both): 2 * 2 * 2 orderings of 12!
    x = [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]
    y = [5, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -4]
    r = correlation.spearman_test(x, y)
    assert r.statistic == -1.0 and r.pvalue == pytest.approx(8 / math.factorial(12), rel=1e-12)
    # ties in one variable only: |rho| < 1, so the t approximation at 12 points
    assert correlation.spearman_test([1, 1] + list(range(2, 12)), list(range(12))).method == "t approximation"
    # a perfect linear fit with 3 points: no division by zero, no NaN
    assert correlation.pearson_test([1.0, 2.0, 3.0], [0.5, 1.0, 1.5]) == (1.0, pytest.approx(1 / 3),
                                                                          "exact permutation")
    assert all(math.isnan(v) for v in correlation.spearman_test([1, 1, 1], [1, 2, 3])[:2])
    assert correlation.spearman_test([1, 1, 1], [1, 2, 3]).method is None
    with pytest.raises(ValueError, match="an exact permutation test needs 2 to 9 points, got 10"):
        correlation.permutation_pvalue(list(range(10)), list(range(10)))


def test_exact_pvalues_match_scipy():
    stats = pytest.importorskip("scipy.stats")  # the [test] extra; not needed to collect
    rng = np.random.default_rng(12)
    for n in (3, 4, 6, 8):  # 9 takes the same path, and scipy 3 s a test there
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        y[1] = y[0]  # a tie
        for test, prep in ((correlation.pearson_test, lambda v: v), (correlation.spearman_test, stats.rankdata)):
            xs, ys = prep(x), prep(y)
            ref = stats.permutation_test((ys,), lambda v, axis: np.abs(stats.pearsonr(xs, v, axis=axis).statistic),
                                         permutation_type="pairings", n_resamples=np.inf, alternative="greater",
                                         vectorized=True, batch=5040)
            got = test(list(x), list(y))
            assert got.method == "exact permutation" and got.pvalue == pytest.approx(ref.pvalue, abs=1e-12), (n, test)
    # without ties the null distribution of rho is symmetric: scipy's own spearmanr permutation test agrees
    x, y = rng.normal(size=6), rng.normal(size=6)
    try:
        ref = stats.spearmanr(x, y, method=stats.PermutationMethod(n_resamples=np.inf)).pvalue
    except TypeError:  # scipy without spearmanr(method=)
        ref = stats.permutation_test((y,), lambda v: stats.spearmanr(x, v).statistic, permutation_type="pairings",
                                     n_resamples=np.inf).pvalue
    assert correlation.spearman_test(list(x), list(y)).pvalue == pytest.approx(ref, abs=1e-12)
