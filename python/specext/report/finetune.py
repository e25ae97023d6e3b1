"""``results.html`` of a causal fine-tuning experiment (``python -m specext.finetune``): the
strategy x metric table and one bar chart per metric, bars with error bars over seeds."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from specext.pipelines import rundir
from specext.report.plots import _plt, _save

COLORS = {"original": "0.55", "FT-FV": "C0", "FT-PV": "C3", "FT-CV": "C2", "FT-RV": "C1"}


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def plot_strategies(table: List[Dict[str, object]], metrics: Sequence[Tuple[str, str]], path: Path) -> None:
    """One panel per metric: a bar per table row (strategy), height the mean over seeds,
    error bar one standard deviation over seeds (none for a single seed)."""
    plt = _plt()
    n = len(metrics)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.7 * rows), squeeze=False)
    names = [str(r["strategy"]) for r in table]
    x = list(range(len(names)))
    for ax, (key, label) in zip(axes.ravel(), metrics):
        means = [_num(r.get(key)) for r in table]
        stds = [_num(r.get(key + "_std")) for r in table]
        err = [0.0 if s != s else s for s in stds]
        ax.bar(x, [0.0 if m != m else m for m in means], yerr=err, capsize=3,
               color=[COLORS.get(s, "C4") for s in names], edgecolor="k", linewidth=0.4)
        for xi, m in zip(x, means):
            if m != m:
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    seeds = max((int(r.get("seeds") or 1) for r in table), default=1)
    fig.suptitle(f"Causal fine-tuning: mean over {seeds} seed(s), error bars one standard deviation", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _cell(r: Dict[str, object], key: str) -> str:
    v = r.get(key)
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    s = r.get(key + "_std")
    return f"{v:.3f}" + (f" ± {s:.3f}" if isinstance(s, float) and s == s else "")


def write_finetune_report(out: Path, table: List[Dict[str, object]], metrics: Sequence[Tuple[str, str]],
                          header: Dict[str, str], notes: List[str]) -> Path:
    """``out/results.html`` and ``out/results.png``; ``header``: label -> value lines shown above
    the table (model, probe, concepts, selection...), ``notes``: paragraphs below it."""
    out = Path(out)
    # Measures that were off (every value n/a) get no panel and no column.
    metrics = [m for m in metrics if any(r.get(m[0]) is not None for r in table)] or list(metrics)
    plot_strategies(table, metrics, out / "results.png")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["strategy", "seeds", "trained vectors"] + [l for _, l in metrics])
    body = ""
    for r in table:
        cells = [str(r["strategy"]), str(r.get("seeds", "")), str(r.get("vectors", ""))] + [_cell(r, k) for k, _ in metrics]
        body += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
    info = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in header.items())
    paras = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>specext causal fine-tuning</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>Causal fine-tuning of selected value vectors</h1>
<table>{info}</table>
<h2>Results (mean ± standard deviation over seeds)</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{paras}
<figure><img src="results.png" alt="results.png"><figcaption>One panel per metric; error bars: one standard
deviation over seeds.</figcaption></figure>
<p>Files: <code>results.csv</code>, <code>results.json</code> (every run, options, selection), one folder per strategy
and seed with the fine-tuned model, <code>selected.safetensors</code> and its <code>results.json</code>.</p>
</body></html>
"""
    path = out / "results.html"
    rundir.write_text(path, doc)
    return path
