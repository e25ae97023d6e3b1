"""report.html and its figures (issue 12): the Gini outliers, the most specialised neurons,
the heatmap's scale, the accuracy bars, the file list, and the finished page in headless
Chromium (every plot loaded, nothing wider than the window)."""

import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import browser
import tiny_models as T
from test_analyze import make_probe
from specext.analyze import main
from specext.report import plots
from specext.report.html import top_neurons


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run of a tiny Llama with every figure (PSS, the null)."""
    base = tmp_path_factory.mktemp("report")
    model = T.save_tiny("llama", base / "llama", seed=1)
    probe = make_probe(base / "probe.jsonl", tiers=("medium", "high", "low"))
    out = base / "run"
    assert main([str(model), "--probe", str(probe), "--out", str(out), "--device", "cpu", "--no-open", "-q"]) == 0
    return out


def _figure(monkeypatch):
    """Capture the figure a plot function would save."""
    got = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: got.setdefault("fig", fig))
    return got


def test_gini_box_plot_draws_the_outliers(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    g = torch.tensor(rng.normal(0.15, 0.03, size=(3, 400)), dtype=torch.float32)
    g[1, :7] = torch.linspace(0.5, 0.66, 7)  # seven very specialised neurons in layer 1
    g[2, 5] = float("nan")  # a dead neuron
    got = _figure(monkeypatch)
    plots.plot_gini_by_layer(g, tmp_path / "g.png")
    ax = got["fig"].axes[0]
    fliers = [l for l in ax.lines if l.get_marker() == "o" and l.get_linestyle() == "None"]
    ys = np.concatenate([np.asarray(l.get_ydata(), dtype=float) for l in fliers])
    assert {0.5, 0.66} <= {round(float(y), 2) for y in ys}
    assert (ys > 0.2).sum() == sum(plots.upper_outliers(d[~np.isnan(d)]) for d in g.numpy())
    assert f"{int((ys > 0.2).sum()):,} neurons above the upper whisker" in ax.get_title()  # plural: 7


def test_heatmap_is_centred_on_the_uniform_share(monkeypatch, tmp_path):
    C, L = 6, 4
    rng = np.random.default_rng(1)
    mass = torch.tensor(1 + 0.05 * rng.random((C, L, 8)), dtype=torch.float32)  # near-uniform
    mass[2, 3] *= 3  # one category dominates layer 3
    got = _figure(monkeypatch)
    plots.plot_layer_category(mass, [f"c{i}" for i in range(C)], tmp_path / "h.png")
    ax = got["fig"].axes[0]
    im = ax.images[0]
    assert im.cmap.name == "RdBu_r" and im.norm.vcenter == pytest.approx(1 / C)
    assert im.norm.halfrange >= 0.25 / C
    # near-uniform cells are near white: the scale is not stretched over their small range
    share = im.get_array()
    r, g, b, _ = im.cmap(im.norm(share[0, 0]))
    assert min(r, g, b) > 0.85
    # readable numbers: dark text on light cells, white on dark ones
    for t in ax.texts:
        i, j = int(round(t.get_position()[1])), int(round(t.get_position()[0]))
        r, g, b, _ = im.cmap(im.norm(share[i, j]))
        light = 0.299 * r + 0.587 * g + 0.114 * b >= 0.5
        assert t.get_color() == ("black" if light else "white")
    assert any(t.get_color() == "white" for t in ax.texts)  # the dominant cell


def test_accuracy_bars_legend_clear_and_tiers_ordered(monkeypatch, tmp_path):
    acc = {"mcq": 1.0, "mcq_norm": 0.9, "open": 0.8}
    summary = {"accuracy_by_category": {"person": acc, "city": acc},
               "accuracy_by_tier": {"medium": acc, "high": acc, "low": acc}}
    got = _figure(monkeypatch)
    plots.plot_accuracy(summary, tmp_path / "a.png")
    fig = got["fig"]
    fig.canvas.draw()
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["high", "medium", "low"]
    legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
    assert len(legends) == 1
    box = legends[0].get_window_extent()
    for ax in fig.axes:
        for bar in ax.patches:
            assert not box.overlaps(bar.get_window_extent()), "the legend covers a bar"
    assert plots.ordered(["low", "x", "high"]) == ["high", "low", "x"]
    assert plots.ordered(["b", "a"]) == ["b", "a"]


def test_dollar_signs_in_probe_labels_do_not_crash_the_plots(tmp_path):
    """A category like 'cost $\\frac{a$' used to start matplotlib's math mode and end the run at
    report time (ParseSyntaxException), after the whole analysis."""
    bad = r"cost $\frac{a$"
    acc = {"mcq": 1.0, "mcq_norm": 0.9, "open": 0.8}
    plots.plot_accuracy({"accuracy_by_category": {bad: acc, "city": acc}}, tmp_path / "a.png")
    plots.plot_layer_category(torch.rand(2, 3, 4), [bad, "city"], tmp_path / "m.png")
    curve = {"curve": [0.1, 0.2], "concepts": 2}
    plots.plot_pss_groups({"ratios": [1.0, 2.0], "by_category": {bad: curve}}, tmp_path / "g.png")
    assert all((tmp_path / f).stat().st_size > 0 for f in ("a.png", "m.png", "g.png"))


def test_recorded_warnings_and_the_signed_delta_are_in_the_report(run_dir):
    import json

    from specext.report.html import _warnings_html

    s = json.loads((run_dir / "summary.json").read_text())
    page = (run_dir / "report.html").read_text()
    assert "signed delta" in page  # the signed score's column and its definition
    box = _warnings_html(dict(s, warnings=["PSS skipped concept 'X <y>' (category 'c'): no usable prompt"],
                              prompts_without_positions=3, positions="subject"))
    assert "Warnings (2)" in box and "X &lt;y&gt;" in box and "3 prompt(s) have no token" in box
    assert _warnings_html(dict(s, warnings=[], prompts_without_positions=0)) == ""
    if s["warnings"]:  # whatever this run recorded is on the page
        assert all(__import__("html").escape(w) in page for w in s["warnings"])


def test_top_neurons_match_the_run_files(run_dir):
    n = load_file(str(run_dir / "neurons.safetensors"))
    m = load_file(str(run_dir / "mass.safetensors"))
    import json

    with safe_open(str(run_dir / "mass.safetensors"), "pt") as f:
        meta = f.metadata()
    concepts, categories = json.loads(meta["concepts"]), json.loads(meta["categories"])
    table = SimpleNamespace(gini=n["gini"], top_category=n["top_category"], top_share=n["top_share"])
    null = SimpleNamespace(excess_gini=n["excess_gini"], above_null=n["above_null"].bool())
    rows = top_neurons(table, categories, 4, null, concepts, m["concept_sums"], m["concept_counts"])
    L, D = n["gini"].shape
    assert len(rows) == 4 * L
    for l in range(L):
        got = [r for r in rows if r["layer"] == l]
        order = np.argsort(-np.nan_to_num(n["gini"][l].numpy(), nan=-1), kind="stable")[:4]
        assert sorted(r["neuron"] for r in got) == sorted(order.tolist())
        assert [r["gini"] for r in got] == sorted((r["gini"] for r in got), reverse=True)
        for r in got:
            i = r["neuron"]
            assert r["top_category"] == categories[int(n["top_category"][l, i])]
            assert r["top_share"] == pytest.approx(float(n["top_share"][l, i]))
            assert r["excess_gini"] == pytest.approx(float(n["excess_gini"][l, i]))
            cm = (m["concept_sums"][:, l, i] / m["concept_counts"][:, l]).double()
            share = cm / cm.sum()
            best = int(share.argmax())
            assert r["top_concepts"][0] == (concepts[best], pytest.approx(float(share[best])))
            assert len(r["top_concepts"]) == 3
    # per-layer lists (as --device-map keeps the sums) give the same rows
    per_layer = top_neurons(table, categories, 4, null, concepts, list(m["concept_sums"].unbind(1)),
                            list(m["concept_counts"].unbind(1)))
    assert per_layer == rows
    # the report shows them
    page = (run_dir / "report.html").read_text()
    assert "<h2>Most specialised neurons</h2>" in page
    section = page.split("<h2>Most specialised neurons</h2>")[1].split("<h2>")[0]
    assert section.count("<tr>") == 1 + 5 * L  # header + 5 per layer (two layers)
    top = rows[0]
    assert f"<td>{top['neuron']}</td><td>{top['gini']:.3f}</td>" in section
    assert top["top_concepts"][0][0] in section


def test_files_footer_lists_every_file(run_dir):
    page = (run_dir / "report.html").read_text()
    footer = page.split("<h2>Files</h2>")[1]
    listed = set(re.findall(r"<li><code>([^<]+)</code>", footer))
    on_disk = {p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert on_disk <= listed, on_disk - listed
    assert {"pss.csv", "pss_layers.json", "summary.json", "report.html", "mass.safetensors"} <= listed


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.SKIP_REASON)
def test_report_in_a_browser(run_dir, tmp_path):
    """report.html in headless Chromium: every <img> loaded (complete, non-zero natural size)
    and the page no wider than the window, at 1700 and 1000 px; a screenshot of it."""
    page = run_dir / "report.html"
    pngs = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert len(pngs) == 8
    for width in (1700, 1000):
        seen = browser.check_page(page, width)
        assert seen["images"] == len(pngs) and seen["broken"] == [], seen
        assert all(w > 100 for w in seen["natural_widths"]), seen
        assert seen["scroll_width"] <= seen["window_width"] == width, seen
    png = browser.screenshot(page, tmp_path / "report.png", 1280, 5000)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.SKIP_REASON)
def test_the_browser_check_sees_missing_images_and_overflow(run_dir, tmp_path):
    """The check itself: a report with a figure deleted and one with a too-wide element fail it."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "accuracy.png").unlink()
    text = (copy / "report.html").read_text()
    (copy / "report.html").write_text(text.replace("<h2>Layers</h2>", '<div style="width:2400px">wide</div>'
                                                                      "<h2>Layers</h2>"))
    seen = browser.check_page(copy / "report.html", 1700)
    assert seen["broken"] == ["accuracy.png"] and seen["scroll_width"] > 1700 and seen["wide"], seen
