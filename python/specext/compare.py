"""``python -m specext.compare RUN_DIR... [--out DIR]``: one row per analysed model,
Pearson and Spearman correlations of peak PSS and of mean Gini with accuracy (the paper's
headline figure: PSS vs SpecWiki accuracy over 20 models), written as ``compare.csv``,
``compare.json`` and ``compare.html`` with a scatter plot.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from . import runio
from .stats import pearson, spearman

logger = logging.getLogger("specext.compare")

COLUMNS = ["run", "model", "architecture", "parameters", "mcq", "mcq_norm", "open", "peak_pss", "peak_ratio",
           "mean_gini", "mean_norm_entropy", "probe", "questions"]


def load_run(run_dir: Path) -> Dict[str, object]:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (is it a finished specext.analyze run directory?)")
    try:
        s = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from None
    pss = s.get("pss") or {}
    acc = s.get("accuracy") or {}
    return {
        "run": str(run_dir), "model": s.get("model"), "architecture": s.get("architecture"),
        "parameters": s.get("parameters"), "mcq": acc.get("mcq"), "mcq_norm": acc.get("mcq_norm"),
        "open": acc.get("open"), "peak_pss": pss.get("peak"), "peak_ratio": pss.get("peak_ratio"),
        "mean_gini": (s.get("neurons") or {}).get("mean_gini"),
        "mean_norm_entropy": (s.get("neurons") or {}).get("mean_norm_entropy"),
        "probe": (s.get("probe") or {}).get("name"), "questions": (s.get("probe") or {}).get("questions"),
    }


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def correlations(rows: List[Dict[str, object]], accuracy: str = "mcq") -> Dict[str, object]:
    out = {}
    for metric in ("peak_pss", "mean_gini"):
        pairs = [(r[metric], r[accuracy]) for r in rows if _finite(r.get(metric)) and _finite(r.get(accuracy))]
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        pr, pp = pearson(x, y) if len(pairs) >= 3 else (float("nan"), float("nan"))
        sr, sp = spearman(x, y) if len(pairs) >= 3 else (float("nan"), float("nan"))
        out[f"{metric}_vs_{accuracy}"] = {"n": len(pairs), "pearson": pr, "pearson_p": pp, "spearman": sr,
                                          "spearman_p": sp}
    return out


def _scatter(rows, accuracy, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in zip(axes, ("peak_pss", "mean_gini"), ("peak PSS", "mean Gini")):
        pts = [(r[metric], r[accuracy], Path(str(r["model"])).name) for r in rows
               if _finite(r.get(metric)) and _finite(r.get(accuracy))]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"accuracy ({accuracy})")
        ax.set_title(f"{label} vs accuracy ({len(pts)} runs)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    runio.write_bytes(path, buf.getvalue())


def compare(run_dirs: List[str], out: Path, accuracy: str = "mcq") -> Dict[str, object]:
    if not run_dirs:
        raise ValueError("give at least one run directory")
    rows = [load_run(Path(d)) for d in run_dirs]
    corr = correlations(rows, accuracy)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    runio.write_text(out / "compare.csv", buf.getvalue())
    result = {"runs": rows, "correlations": corr, "accuracy": accuracy}
    runio.write_json(out / "compare.json", result)
    _scatter(rows, accuracy, out / "compare.png")
    f = lambda v: "n/a" if not _finite(v) else (f"{v:.4g}")  # noqa: E731
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]) if not isinstance(r[c], float) else f(r[c]))}</td>"
                                   for c in COLUMNS) + "</tr>" for r in rows)
    crs = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['n']}</td><td>{f(v['pearson'])}</td><td>{f(v['pearson_p'])}</td>"
                  f"<td>{f(v['spearman'])}</td><td>{f(v['spearman_p'])}</td></tr>" for k, v in corr.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>specext compare</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}}</style></head><body><h1>specext: {len(rows)} runs compared</h1>
<h2>Correlation with accuracy ({html.escape(accuracy)})</h2><table><tr><th>pair</th><th>n</th><th>Pearson r</th><th>p</th>
<th>Spearman rho</th><th>p</th></tr>{crs}</table><img src="compare.png" style="max-width:100%">
<h2>Runs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in COLUMNS)}</tr>{trs}</table></body></html>"""
    runio.write_text(out / "compare.html", doc)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specext.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories written by python -m specext.analyze")
    p.add_argument("--out", default="specext-compare", help="output directory")
    p.add_argument("--accuracy", default="mcq", choices=["mcq", "mcq_norm", "open"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = compare(args.runs, Path(args.out), args.accuracy)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, v in res["correlations"].items():
        print(f"{k:28s} n={v['n']:<3d} pearson {v['pearson']:.3f} (p={v['pearson_p']:.3g})  "
              f"spearman {v['spearman']:.3f} (p={v['spearman_p']:.3g})")
    print(f"wrote {args.out}/compare.csv, compare.json, compare.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
