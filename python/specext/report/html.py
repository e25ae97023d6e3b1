"""``report.html`` for a run directory: the tables, the headline numbers and the figures of
:mod:`specext.report.plots`."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch

from specext.pipelines import rundir
from specext.report.plots import (plot_accuracy, plot_gini_by_layer, plot_gini_null, plot_layer_category,
                                  plot_norm_entropy, plot_pss_curve, plot_pss_groups, plot_pss_layers)

logger = logging.getLogger(__name__)


def _table(rows: List[List[str]], header: List[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>'


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
    sg = pss.get("delta_signed")  # runs of older versions have no signed score
    rows = [["0 (no mask)", _ci(pss["floor"], pss.get("floor_ci")), "", "0", ""] + (["0", ""] if sg else [])
            + [_f(pss.get("cs_before")), _f(pss.get("g_before"))]]
    for i, r in enumerate(pss["ratios"]):
        signed = ([_ci(sg["curve"][i], sg["curve_ci"][i]),
                   _ci((sg["random_curve"] or none)[i], (sg["random_curve_ci"] or none)[i])] if sg else [])
        rows.append([f"{r:g}%", _ci(pa["curve"][i], pa["curve_ci"][i]),
                     _ci((pa["random_curve"] or none)[i], (pa["random_curve_ci"] or none)[i]),
                     _ci(de["curve"][i], de["curve_ci"][i]),
                     _ci((de["random_curve"] or none)[i], (de["random_curve_ci"] or none)[i])] + signed
                    + [_f(pss["cs_curve"][i]), _f(pss["g_curve"][i])])
    head = {"paper": "the paper's PSS", "delta": "the baseline-corrected PSS delta"}[pss["score"]]
    return (f"<h2>Parameter Specialization Score</h2><p>Headline ({html.escape(head)}): peak "
            f"<b>{_ci(pss['peak'], pss.get('peak_ci'))}</b> at {pss['peak_ratio']}% of value vectors masked "
            f"(random vectors: {_ci(pss.get('random_peak'), pss.get('random_peak_ci'))}). The paper's score has a "
            f"<b>floor</b> of {_ci(pss['floor'], pss.get('floor_ci'))} before anything is masked (concepts easier or "
            f"harder than the control set); the delta score subtracts it. {pss['concepts']} concepts, "
            f"{pss['control_questions']} control questions, unrelated set '{html.escape(pss['unrelated'])}', "
            f"{html.escape(pss['selection'])} selection, denominator '{html.escape(pss['denominator'])}', metric "
            f"{html.escape(pss['metric'])}, random control '{html.escape(str(pss.get('random_match', 'uniform')))}'; "
            + (f"brackets: 95% bootstrap intervals over concepts ({pss.get('bootstrap')} resamples)."
               if pss.get("bootstrap") else "no intervals (--bootstrap 0).")
            + (" <b>signed delta</b> = ((CS before - CS) - (G before - G)) / A: how much more the mask cost the "
               "concept than the control, centred on 0 when masking does nothing concept-specific (the absolute "
               "delta is above 0 even then)." if sg else "")
            + (f" <b>The peak is at the largest ratio tried ({max(pss['ratios']):g}%)</b>: a lower bound, a larger "
               "ratio might score higher." if pss.get("peak_at_largest_ratio") else "") + "</p>"
            + _table(rows, ["ratio", "PSS (paper)", "random", "PSS delta", "random"]
                     + (["signed delta", "random"] if sg else []) + ["mean CS", "mean G"]))


def _warnings_html(summary) -> str:
    """Every warning the run recorded (summary.json ``warnings``) and the prompts left out
    for want of positions, in a box at the top: a caveat only in summary.json is one a
    reader of the report never sees."""
    items = list(summary.get("warnings") or [])
    missing = summary.get("prompts_without_positions")
    if missing:
        items.append(f"{missing} prompt(s) have no token at the --positions '{summary.get('positions')}' positions "
                     "(e.g. the concept's name is not in the question) and are left out of the mass")
    if not items:
        return ""
    return ('<div style="background:#fff4e0;border:1px solid #e0a040;padding:.5em 1em;margin:1em 0"><b>Warnings '
            f"({len(items)})</b><ul>" + "".join(f"<li>{html.escape(str(w))}</li>" for w in items) + "</ul></div>")


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
            f"random (P = {n.get('null_permutations')}: P + 1 permutations, category sizes kept): the Gini that finite "
            "samples give with no category structure. <b>Excess Gini</b> = Gini - null. A neuron is <b>above its "
            "null</b> when its Gini, standardised against P of its own permutation draws, exceeds the 99th percentile "
            "of the layer's pooled null draws, each standardised against its P other draws (1% expected by chance)."
            + (" The <b>random-init twin</b> is the same architecture with seeded random weights on the same probe "
               "and positions: what template words alone give." if tw else "") + "</p>"
            + _table(rows, ["", "mean Gini", "mean null Gini", "mean excess Gini", "share above null"]))


def _layer(x, l: int) -> torch.Tensor:
    """Layer ``l`` of a ``(K, L, ...)`` tensor or of a list of per-layer ``(K, ...)`` tensors."""
    return x[:, l] if isinstance(x, torch.Tensor) else x[l]


def top_neurons(table, categories: List[str], k: int, null=None, concepts: Optional[List[str]] = None,
                concept_sums: Optional[torch.Tensor] = None, concept_counts: Optional[torch.Tensor] = None,
                n_concepts: int = 3) -> List[Dict]:
    """The ``k`` live neurons of each layer with the highest Gini, highest first: ``layer``,
    ``neuron`` (the index into neurons.safetensors' ``(L, d_ff)`` arrays and the
    down-projection's column), ``gini``, ``top_category`` (a name), ``top_share``; with
    ``null`` their ``excess_gini`` and ``above_null``; with the concept sums ``(K, L, d_ff)``
    and counts ``(K, L)`` (mass.safetensors' ``concept_sums``, ``concept_counts``; or lists of
    per-layer ``(K, d_ff)`` and ``(K,)`` tensors, each on its layer's device) the
    ``top_concepts``: ``n_concepts`` (name, share) pairs, a concept's mass over the sum of
    the neuron's concept masses (1/K each were it spread evenly)."""
    gini = table.gini.detach().cpu().float()
    L, D = gini.shape
    vals, idx = torch.nan_to_num(gini, nan=-1.0).topk(min(k, D), dim=1)
    vals, idx = vals.tolist(), idx.tolist()  # host: already on the CPU
    tc, ts = table.top_category.detach().cpu(), table.top_share.detach().cpu()
    ex = None if null is None else (null.excess_gini.detach().cpu(), null.above_null.detach().cpu())
    rows = []
    for l in range(L):
        live = [(v, i) for v, i in zip(vals[l], idx[l]) if v >= 0]  # dead neurons (NaN) rank last and are left out
        if not live:
            continue
        sel = torch.as_tensor([i for _, i in live])
        cat, share = tc[l, sel].tolist(), ts[l, sel].tolist()  # host: on the CPU
        exg, above = (ex[0][l, sel].tolist(), ex[1][l, sel].bool().tolist()) if ex else (None, None)  # host: on the CPU
        cm = None
        if concept_sums is not None and concept_counts is not None and concepts:
            n = _layer(concept_counts, l).detach().double().cpu()
            cs = _layer(concept_sums, l)  # (K, d_ff): only the selected columns come to the host
            cm = cs.index_select(-1, sel.to(cs.device)).detach().double().cpu()
            cm = torch.where(n[:, None] > 0, cm / n.clamp_min(1)[:, None], torch.zeros((), dtype=cm.dtype))  # (K, k)
            cm = (cm / cm.sum(0, keepdim=True).clamp_min(1e-300)).T  # (k, K): shares
            top_v, top_i = cm.topk(min(n_concepts, cm.shape[1]), dim=1)
            cm = (top_v.cpu().tolist(), top_i.cpu().tolist())
        for j, (g, i) in enumerate(live):
            row = {"layer": l, "neuron": i, "gini": g,
                   "top_category": categories[cat[j]] if 0 <= cat[j] < len(categories) else "n/a",
                   "top_share": share[j]}
            if ex:
                row["excess_gini"], row["above_null"] = exg[j], above[j]
            if cm is not None:
                row["top_concepts"] = [(concepts[c], v) for v, c in zip(cm[0][j], cm[1][j]) if v > 0]
            rows.append(row)
    return rows


def _top_neurons_html(rows: List[Dict], k: int, n_categories: int, n_concepts: Optional[int]) -> str:
    if not rows:
        return ""
    has_null, has_concepts = "excess_gini" in rows[0], "top_concepts" in rows[0]
    head = ["layer", "neuron", "Gini"] + (["excess Gini", "above null"] if has_null else []) + [
        "top category", "share"] + (["top concepts by mass (share)"] if has_concepts else [])
    body = []
    for r in rows:
        cells = [str(r["layer"]), str(r["neuron"]), f"{r['gini']:.3f}"]
        if has_null:
            cells += [_f(r["excess_gini"]), "yes" if r["above_null"] else "no"]
        cells += [r["top_category"], f"{r['top_share']:.3f}"]
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        if has_concepts:
            tds += '<td class="l">' + html.escape(", ".join(f"{c} ({v:.3f})" for c, v in r["top_concepts"])) + "</td>"
        body.append(f"<tr>{tds}</tr>")
    ths = "".join(("<th class=l>" if h.startswith("top concepts") else "<th>") + html.escape(h) + "</th>" for h in head)
    even = (f" Concept shares: the concept's mean mass over the sum of the neuron's concept masses (1/{n_concepts} = "
            f"{1 / n_concepts:.3f} each were it spread evenly).") if has_concepts and n_concepts else ""
    return (f"<h2>Most specialised neurons</h2><p>The {k} live neurons of each layer with the highest Gini over "
            f"categories (at most 1 - 1/{n_categories} = {1 - 1 / n_categories:.3f}): the outliers of the Gini box "
            f"plot. <b>neuron</b> indexes the <code>(layer, d_ff)</code> arrays of <code>neurons.safetensors</code> "
            f"and the column of the layer's down-projection; <b>share</b> is the top category's share of the "
            f"neuron's mass (uniform 1/{n_categories} = {1 / n_categories:.3f}).{even}</p>"
            f'<div class="scroll{" tall" if len(rows) > 25 else ""}"><table><thead><tr>{ths}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


# What each file of a run directory holds (the report's footer lists every file the run wrote).
FILES = {
    "summary.json": "the headline numbers (written last: its presence marks a complete run)",
    "config.json": "all options, versions, the fingerprint and the memory plan",
    "neurons.safetensors": "per-neuron (layer, d_ff) arrays: gini, entropy, norm_entropy, top_category, top_share, "
                           "total, value_norms and, with the null, gini_null, excess_gini, null_z, above_null",
    "mass.safetensors": "concept_sums, concept_counts and category_mass",
    "concepts.csv": "accuracy per concept",
    "questions.jsonl": "one line per question: predictions, log-likelihoods, open-ended answer",
    "pss.csv": "PSS per concept and ratio",
    "pss_curve.csv": "the PSS curves with their intervals, the peaks and the floor",
    "pss_layers.json": "per ratio, how many of the masked value vectors each layer holds",
    "report.html": "this page",
}


def _files_html(out: Path, plots: List[str]) -> str:
    present = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} if out.is_dir() else set()
    names = [f for f in FILES if f in present or f in ("summary.json", "report.html")]
    names += sorted(present - set(names) - set(plots) - {"report.html"}) + list(plots)
    items = "".join(f"<li><code>{html.escape(f)}</code>"
                    + (f": {html.escape(FILES[f])}" if f in FILES else (": a figure above" if f in plots else ""))
                    + "</li>" for f in names)
    return f"<h2>Files</h2><ul class=\"files\">{items}</ul>"


def write_report(out: Path, summary: Dict, table, cat_mass: torch.Tensor, categories: List[str],
                 pss_layers: Dict = None, null=None, twin_gini: torch.Tensor = None,
                 concepts: Optional[List[str]] = None, concept_sums: Optional[torch.Tensor] = None,
                 concept_counts: Optional[torch.Tensor] = None, top_k: Optional[int] = None) -> Path:
    """Write the PNGs and ``report.html`` into ``out``; returns the HTML path. ``concepts`` and
    the concept sums and counts (as in mass.safetensors) add each top neuron's top concepts;
    ``top_k`` neurons per layer in that table (default 5, 3 past 16 layers)."""
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
        "gini_by_layer.png": "How unevenly each neuron's mass spreads over categories, by layer (0 = even, 1 - 1/C = one "
                             "category); the points above the whiskers are the most specialised neurons (table below).",
        "norm_entropy_hist.png": "Category entropy of every live neuron, normalised by ln C.",
        "layer_category_mass.png": "Each layer's total MLP mass split over categories; white is the uniform share "
                                   "1/C, red above it, blue below (the colour scale spans at least 25% of 1/C either "
                                   "way, so near-uniform layers look near-uniform).",
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
    L = table.gini.shape[0]
    k = top_k or (5 if L <= 16 else 3)
    top = top_neurons(table, probe["categories"], k, null, concepts, concept_sums, concept_counts)
    top_html = _top_neurons_html(top, k, len(categories), len(concepts) if concepts else None)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>specext report: {html.escape(str(summary['model']))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}figure{{margin:1em 0}}img{{max-width:100%}}code{{background:#f3f3f3;padding:1px 4px}}td.l,th.l{{text-align:left}}
.scroll{{overflow-x:auto;max-width:100%;margin:.5em 0 1.5em}}.scroll table{{margin:0}}
.tall{{max-height:36em;overflow-y:auto}}.tall th{{position:sticky;top:0}}</style></head><body>
<h1>specext report</h1>
<p>Model <code>{html.escape(str(summary['model']))}</code> ({html.escape(summary['architecture'])},
{summary['parameters']:,} parameters) on probe <b>{html.escape(probe['name'])}</b>: {probe['questions']} questions,
{probe['concepts']} concepts, {len(probe['categories'])} categories ({html.escape(', '.join(probe['categories']))}).
Run time {summary['seconds']} s.</p>
{_warnings_html(summary)}
<h2>Accuracy</h2>{_table(acc_rows, ['metric', 'value']) if a.get('applicable') else '<p>Not applicable: the model has no language-model head (specialisation only).</p>'}
{_pss_html(pss)}
{_controls_html(summary)}
<h2>Neurons</h2>{_table(neu_rows, ['aggregate (live neurons)', 'value'])}
{('<p>Categories without usable prompts: ' + html.escape(', '.join(summary['empty_categories'])) + '</p>') if summary.get('empty_categories') else ''}
{('<p>Non-finite activations (prompt-layers left out): ' + html.escape(json.dumps(summary['nonfinite_prompt_layers'])) + '</p>') if any(summary.get('nonfinite_prompt_layers', [])) else ''}
<h2>Plots</h2>{imgs}
{top_html}
<h2>Layers</h2>{_table(layer_rows, ['layer', 'mean Gini', 'mean excess Gini', 'share above null', 'median Gini', 'share Gini > 0.3', 'mean norm. entropy', 'dead', 'categories'])}
{('<p>Categories left out at some layers (no usable prompt there): ' + html.escape(json.dumps(summary['categories_dropped_by_layer'])) + '</p>') if summary.get('categories_dropped_by_layer') else ''}
{_files_html(out, list(plots))}
</body></html>
"""
    path = out / "report.html"
    rundir.write_text(path, doc)
    return path
