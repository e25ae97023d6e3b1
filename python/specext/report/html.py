"""``report.html`` for a run directory: the tables, the headline numbers and the figures of
:mod:`specext.report.plots`."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Dict, List

import torch

from specext.pipelines import rundir
from specext.report.plots import (plot_accuracy, plot_gini_by_layer, plot_gini_null, plot_layer_category,
                                  plot_norm_entropy, plot_pss_curve, plot_pss_groups, plot_pss_layers)

logger = logging.getLogger(__name__)


def _table(rows: List[List[str]], header: List[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _f(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _ci(v, c) -> str:
    return _f(v) + ("" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]")


def _pss_html(pss) -> str:
    if not pss:
        return ""
    n = len(pss["ratios"])
    none = [None] * n
    pa, de = pss["paper"], pss["delta"]
    rows = [["0 (no mask)", _ci(pss["floor"], pss.get("floor_ci")), "", "0", "", _f(pss.get("cs_before")),
             _f(pss.get("g_before"))]]
    for i, r in enumerate(pss["ratios"]):
        rows.append([f"{r:g}%", _ci(pa["curve"][i], pa["curve_ci"][i]),
                     _ci((pa["random_curve"] or none)[i], (pa["random_curve_ci"] or none)[i]),
                     _ci(de["curve"][i], de["curve_ci"][i]),
                     _ci((de["random_curve"] or none)[i], (de["random_curve_ci"] or none)[i]),
                     _f(pss["cs_curve"][i]), _f(pss["g_curve"][i])])
    head = {"paper": "the paper's PSS", "delta": "the baseline-corrected PSS delta"}[pss["score"]]
    return (f"<h2>Parameter Specialization Score</h2><p>Headline ({html.escape(head)}): peak "
            f"<b>{_ci(pss['peak'], pss.get('peak_ci'))}</b> at {pss['peak_ratio']}% of value vectors masked "
            f"(random vectors: {_ci(pss.get('random_peak'), pss.get('random_peak_ci'))}). The paper's score has a "
            f"<b>floor</b> of {_ci(pss['floor'], pss.get('floor_ci'))} before anything is masked (concepts easier or "
            f"harder than the control set); the delta score subtracts it. {pss['concepts']} concepts, "
            f"{pss['control_questions']} control questions, unrelated set '{html.escape(pss['unrelated'])}', "
            f"{html.escape(pss['selection'])} selection, denominator '{html.escape(pss['denominator'])}', metric "
            f"{html.escape(pss['metric'])}; brackets: 95% bootstrap intervals over concepts "
            f"({pss.get('bootstrap')} resamples).</p>"
            + _table(rows, ["ratio", "PSS (paper)", "random", "PSS delta", "random", "mean CS", "mean G"]))


def _controls_html(summary) -> str:
    n = summary["neurons"]
    if "mean_gini_null" not in n:
        return ""
    rows = [["model", _f(n["mean_gini"]), _f(n["mean_gini_null"]), _f(n["mean_excess_gini"]),
             _f(n["share_above_null"])]]
    tw = summary.get("random_twin")
    if tw:
        rows.append(["random-init twin", _f(tw["mean_gini"]), _f(tw.get("mean_gini_null")),
                     _f(tw.get("mean_excess_gini")), _f(tw.get("share_above_null"))])
        r = tw["model_over_twin"]
        rows.append(["model / twin", _f(r["mean_gini"]), "", _f(r["mean_excess_gini"]), ""])
    return ("<h2>Specialisation against its controls</h2><p>The <b>null</b> reassigns concepts to categories at "
            f"random ({n.get('null_permutations')} permutations, category sizes kept): the Gini that finite samples "
            "give with no category structure. <b>Excess Gini</b> = Gini - null. A neuron is <b>above its null</b> when "
            "its Gini, standardised against its own permutation draws, exceeds the 99th percentile of the layer's "
            "pooled null draws (1% expected by chance)."
            + (" The <b>random-init twin</b> is the same architecture with seeded random weights on the same probe "
               "and positions: what template words alone give." if tw else "") + "</p>"
            + _table(rows, ["", "mean Gini", "mean null Gini", "mean excess Gini", "share above null"]))


def write_report(out: Path, summary: Dict, table, cat_mass: torch.Tensor, categories: List[str],
                 pss_layers: Dict = None, null=None, twin_gini: torch.Tensor = None) -> Path:
    """Write the PNGs and ``report.html`` into ``out``; returns the HTML path."""
    out = Path(out)
    plots = {
        "gini_by_layer.png": lambda p: plot_gini_by_layer(table.gini.cpu(), p),
        "norm_entropy_hist.png": lambda p: plot_norm_entropy(table.norm_entropy.cpu(), p),
        "layer_category_mass.png": lambda p: plot_layer_category(cat_mass.cpu(), categories, p),
    }
    if "mean_gini_null" in summary["neurons"]:
        plots["gini_null.png"] = lambda p: plot_gini_null(summary, p)
    if summary["accuracy"].get("applicable"):
        plots["accuracy.png"] = lambda p: plot_accuracy(summary, p)
    pss = summary.get("pss")
    if pss:
        plots["pss_curve.png"] = lambda p: plot_pss_curve(pss, p)
        plots["pss_groups.png"] = lambda p: plot_pss_groups(pss, p)
        if pss_layers:
            plots["pss_layers.png"] = lambda p: plot_pss_layers(pss_layers, p)
    for name, fn in plots.items():
        fn(out / name)
    a, n = summary["accuracy"], summary["neurons"]
    acc_rows = [["mcq (acc)", _f(a["mcq"])], ["mcq_norm (acc_norm)", _f(a["mcq_norm"])], ["open-ended", _f(a["open"])]]
    neu_rows = [[k, _f(v)] for k, v in n.items()]
    layer_rows = [[l["layer"], _f(l["mean_gini"]), _f(l.get("mean_excess_gini")), _f(l.get("share_above_null")),
                   _f(l["median_gini"]), _f(l["share_gini_above_0.3"]), _f(l["mean_norm_entropy"]), l["dead"],
                   l.get("categories_used", "")] for l in summary["layers"]]
    captions = {
        "gini_by_layer.png": "How unevenly each neuron's mass spreads over categories, by layer (0 = even, 1 - 1/C = one category).",
        "norm_entropy_hist.png": "Category entropy of every live neuron, normalised by ln C.",
        "layer_category_mass.png": "Each layer's total MLP mass split over categories.",
        "accuracy.png": "Probe accuracy by category and frequency tier.",
        "pss_curve.png": "Both PSS scores as more value vectors are masked, against masking as many random vectors; "
                         "left the paper's score with its floor (no mask) at 0, right the baseline-corrected delta; "
                         "bands are 95% bootstrap intervals over concepts.",
        "gini_null.png": "Mean Gini per layer next to its permutation null (and the random-init twin, when run); "
                         "right, the share of neurons above their null's 99th percentile.",
        "pss_groups.png": "PSS by frequency tier and by category (number of concepts in brackets).",
        "pss_layers.png": "Layer distribution of the masked (top differential) value vectors, per ratio.",
    }
    imgs = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{html.escape(captions.get(name, name))} '
                   f'<small>({name})</small></figcaption></figure>' for name in plots)
    probe = summary["probe"]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>specext report: {html.escape(str(summary['model']))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}figure{{margin:1em 0}}img{{max-width:100%}}code{{background:#f3f3f3;padding:1px 4px}}</style></head><body>
<h1>specext report</h1>
<p>Model <code>{html.escape(str(summary['model']))}</code> ({html.escape(summary['architecture'])},
{summary['parameters']:,} parameters) on probe <b>{html.escape(probe['name'])}</b>: {probe['questions']} questions,
{probe['concepts']} concepts, {len(probe['categories'])} categories ({html.escape(', '.join(probe['categories']))}).
Run time {summary['seconds']} s.</p>
<h2>Accuracy</h2>{_table(acc_rows, ['metric', 'value']) if a.get('applicable') else '<p>Not applicable: the model has no language-model head (specialisation only).</p>'}
{_pss_html(pss)}
{_controls_html(summary)}
<h2>Neurons</h2>{_table(neu_rows, ['aggregate (live neurons)', 'value'])}
{('<p>Categories without usable prompts: ' + html.escape(', '.join(summary['empty_categories'])) + '</p>') if summary.get('empty_categories') else ''}
{('<p>Non-finite activations (prompt-layers left out): ' + html.escape(json.dumps(summary['nonfinite_prompt_layers'])) + '</p>') if any(summary.get('nonfinite_prompt_layers', [])) else ''}
<h2>Plots</h2>{imgs}
<h2>Layers</h2>{_table(layer_rows, ['layer', 'mean Gini', 'mean excess Gini', 'share above null', 'median Gini', 'share Gini > 0.3', 'mean norm. entropy', 'dead', 'categories'])}
{('<p>Categories left out at some layers (no usable prompt there): ' + html.escape(json.dumps(summary['categories_dropped_by_layer'])) + '</p>') if summary.get('categories_dropped_by_layer') else ''}
<p>Files: <code>summary.json</code>, <code>config.json</code> (all options and versions), <code>neurons.safetensors</code>,
<code>mass.safetensors</code>, <code>concepts.csv</code>, <code>questions.jsonl</code>, <code>pss.csv</code> (per concept and ratio),
<code>pss_curve.csv</code> (curves with intervals).</p>
</body></html>
"""
    path = out / "report.html"
    rundir.write_text(path, doc)
    return path
