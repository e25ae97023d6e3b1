"""python -m specext.compare: strict JSON with reasons, run labels, differing settings, the
formatting of its tables, and compare.html in a real browser (issue 12)."""

import json
import logging

import pytest

import browser
from specext.compare import compare, fmt_count, fmt_num, main, run_labels


def write_run(d, acc=0.6, pss=0.1, gini=0.2, questions=100, pss_concepts=24, ratios=(0.1, 1.0, 10.0), model="m",
              probe="world", config=True):
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
        (d / "config.json").write_text(json.dumps({"options": {"stat": "abs"}}))
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
