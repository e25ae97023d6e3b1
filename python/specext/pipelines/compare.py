"""``python -m specext.compare RUN_DIR... [--out DIR]``: one row per analysed model,
Pearson and Spearman correlations of peak PSS, mean Gini and mean excess Gini with accuracy
(the paper's headline figure: PSS vs SpecWiki accuracy over 20 models), written as
``compare.csv``, ``compare.json`` and ``compare.html`` with a scatter plot.

Every run's peak PSS comes with its 95% bootstrap interval over concepts (from its
``summary.json``); every correlation with its two-sided p-value and a 95% bootstrap interval
over runs. ``--pss-score paper|delta`` picks the score; by default the runs' own headline
score, which must then be the same for every run.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from specext.pipelines import rundir
from specext._deps import require
from specext._options import at_least, one_of
from specext.metrics.bootstrap import bootstrap_correlation
from specext.metrics.correlation import pearson, spearman

logger = logging.getLogger("specext.compare")

COLUMNS = ["run", "model", "architecture", "parameters", "mcq", "mcq_norm", "open", "pss_score", "peak_pss",
           "peak_pss_ci_low", "peak_pss_ci_high", "peak_ratio", "pss_floor", "mean_gini", "mean_gini_null",
           "mean_excess_gini", "share_above_null", "twin_mean_gini", "twin_mean_excess_gini", "gini_over_twin",
           "excess_gini_over_twin", "mean_norm_entropy", "probe", "questions", "positions"]
METRICS = ("peak_pss", "mean_gini", "mean_excess_gini")
SCORES = ("paper", "delta")


def load_run(run_dir: Path, score: Optional[str] = None) -> Dict[str, object]:
    """One row of the comparison from a run directory's ``summary.json``; ``score`` picks the
    PSS score (``paper``/``delta``; default the run's headline)."""
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        # summary.json is written last: without it the run did not finish (or is still running)
        if Path(run_dir).is_dir() and any((Path(run_dir) / f).exists()
                                          for f in (rundir.STATE, "config.json", "neurons.safetensors", rundir.LOCK)):
            raise ValueError(f"{run_dir}: incomplete run directory (no summary.json: the run failed, was killed or "
                             f"is still running); finish it with `python -m specext.analyze ... --resume`")
        raise FileNotFoundError(f"{run_dir}: no summary.json (is it a finished specext.analyze run directory?)")
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a specext summary: invalid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read it ({e.strerror or e})") from None
    _check_summary(p, s)
    pss = s.get("pss") or {}
    acc = s.get("accuracy") or {}
    neu = s.get("neurons") or {}
    twin = s.get("random_twin") or {}
    sc = score or pss.get("score") or ("paper" if pss else None)
    block = pss.get(sc) if sc and isinstance(pss.get(sc), dict) else (pss if sc == "paper" and "peak" in pss else {})
    if pss and not block:
        raise ValueError(f"{p}: has no '{sc}' PSS score (written by an older specext?); rerun the analysis")
    ci = block.get("peak_ci") or [None, None]
    ratio = (twin.get("model_over_twin") or {})
    return {
        "run": str(run_dir), "model": s.get("model"), "architecture": s.get("architecture"),
        "parameters": s.get("parameters"), "mcq": acc.get("mcq"), "mcq_norm": acc.get("mcq_norm"),
        "open": acc.get("open"), "pss_score": sc if pss else None, "peak_pss": block.get("peak"),
        "peak_pss_ci_low": ci[0], "peak_pss_ci_high": ci[1], "peak_ratio": block.get("peak_ratio"),
        "pss_floor": pss.get("floor"),
        "mean_gini": neu.get("mean_gini"), "mean_gini_null": neu.get("mean_gini_null"),
        "mean_excess_gini": neu.get("mean_excess_gini"), "share_above_null": neu.get("share_above_null"),
        "twin_mean_gini": twin.get("mean_gini"), "twin_mean_excess_gini": twin.get("mean_excess_gini"),
        "gini_over_twin": ratio.get("mean_gini"), "excess_gini_over_twin": ratio.get("mean_excess_gini"),
        "mean_norm_entropy": neu.get("mean_norm_entropy"),
        "probe": (s.get("probe") or {}).get("name"), "questions": (s.get("probe") or {}).get("questions"),
        "positions": s.get("positions"),
    }


# summary.json's fields that compare reads: (path, allowed types); None is always allowed.
_NUM = (int, float)
_SUMMARY_FIELDS = (
    ("model", (str,)), ("architecture", (str,)), ("parameters", (int,)), ("positions", (str,)),
    ("accuracy", (dict,)), ("accuracy.mcq", _NUM), ("accuracy.mcq_norm", _NUM), ("accuracy.open", _NUM),
    ("neurons", (dict,)), ("neurons.mean_gini", _NUM), ("neurons.mean_gini_null", _NUM),
    ("neurons.mean_excess_gini", _NUM), ("neurons.share_above_null", _NUM), ("neurons.mean_norm_entropy", _NUM),
    ("probe", (dict,)), ("probe.name", (str,)), ("probe.questions", (int,)),
    ("pss", (dict,)), ("pss.score", (str,)), ("pss.floor", _NUM),
    ("pss.paper", (dict,)), ("pss.delta", (dict,)),
    ("pss.paper.peak", _NUM), ("pss.paper.peak_ratio", _NUM), ("pss.paper.peak_ci", (list,)),
    ("pss.delta.peak", _NUM), ("pss.delta.peak_ratio", _NUM), ("pss.delta.peak_ci", (list,)),
    ("random_twin", (dict,)), ("random_twin.mean_gini", _NUM), ("random_twin.mean_excess_gini", _NUM),
    ("random_twin.model_over_twin", (dict,)),
)


def _check_summary(p: Path, s) -> None:
    """A malformed summary.json (hand-edited, another tool's, cut short by a copy) is refused
    naming the file and the field, before a field of the wrong type reaches the table."""
    if not isinstance(s, dict):
        raise ValueError(f"{p}: not a specext summary: the file holds a JSON {type(s).__name__}, not an object")
    if "accuracy" not in s or "neurons" not in s:
        missing = [k for k in ("accuracy", "neurons") if k not in s]
        raise ValueError(f"{p}: not a specext summary: no {' or '.join(repr(k) for k in missing)} field "
                         f"(fields: {', '.join(list(s)[:10]) or 'none'})")
    for path, types in _SUMMARY_FIELDS:
        v, ok = s, True
        for part in path.split("."):
            if not isinstance(v, dict) or part not in v:
                ok = False
                break
            v = v[part]
        if not ok or v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            want = " or ".join({"int": "an integer", "float": "a number", "str": "a string", "dict": "an object",
                                "list": "a list"}[t.__name__] for t in types)
            raise ValueError(f"{p}: malformed summary: '{path}' is {json.dumps(v)[:60]} ({type(v).__name__}), "
                             f"expected {want}")
    for sc in ("paper", "delta"):
        ci = ((s.get("pss") or {}).get(sc) or {}).get("peak_ci")
        if ci is not None and (len(ci) != 2 or not all(x is None or isinstance(x, _NUM) for x in ci)):
            raise ValueError(f"{p}: malformed summary: 'pss.{sc}.peak_ci' is {json.dumps(ci)[:60]}, expected "
                             "[low, high]")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def correlations(rows: List[Dict[str, object]], accuracy: str = "mcq", bootstrap: int = 1000,
                 seed: int = 0) -> Dict[str, object]:
    """Pearson and Spearman correlation of each metric with accuracy over runs, with two-sided
    p-values and 95% bootstrap intervals (runs resampled with replacement)."""
    out = {}
    for metric in METRICS:
        pairs = [(r[metric], r[accuracy]) for r in rows if _finite(r.get(metric)) and _finite(r.get(accuracy))]
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        pr, pp = pearson(x, y) if len(pairs) >= 3 else (float("nan"), float("nan"))
        sr, sp = spearman(x, y) if len(pairs) >= 3 else (float("nan"), float("nan"))
        b = bootstrap_correlation(x, y, bootstrap, seed)
        out[f"{metric}_vs_{accuracy}"] = {"n": len(pairs), "pearson": pr, "pearson_p": pp,
                                          "pearson_ci": b["pearson_ci"], "spearman": sr, "spearman_p": sp,
                                          "spearman_ci": b["spearman_ci"], "bootstrap_resamples": b["resamples_used"]}
    return out


def _scatter(rows, accuracy, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, metric, label in zip(axes, METRICS, ("peak PSS (95% interval)", "mean Gini", "mean excess Gini")):
        pts = [(r[metric], r[accuracy], Path(str(r["model"])).name, r) for r in rows
               if _finite(r.get(metric)) and _finite(r.get(accuracy))]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        if metric == "peak_pss":
            for x, y, _, r in pts:
                lo, hi = r.get("peak_pss_ci_low"), r.get("peak_pss_ci_high")
                if _finite(lo) and _finite(hi):
                    ax.plot([lo, hi], [y, y], color="C0", alpha=0.5, lw=1.5)
        for x, y, name, _ in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"accuracy ({accuracy})")
        ax.set_title(f"{label} vs accuracy ({len(pts)} runs)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    rundir.write_bytes(path, buf.getvalue())


def compare(run_dirs: List[str], out: Path, accuracy: str = "mcq", score: Optional[str] = None,
            bootstrap: int = 1000, seed: int = 0) -> Dict[str, object]:
    require("matplotlib", what="specext.compare")
    if not run_dirs:
        raise ValueError("give at least one run directory")
    if score is not None:
        one_of("--pss-score", score, SCORES)
    at_least("--bootstrap", bootstrap, 10, off=0, unit=" resamples")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory: give a directory (created if missing) "
                         "for compare.csv, compare.json and compare.html")
    rows = [load_run(Path(d), score) for d in run_dirs]
    used = sorted({r["pss_score"] for r in rows if r["pss_score"]})
    if len(used) > 1:
        raise ValueError(f"the runs' headline PSS scores differ ({', '.join(used)}); choose one with --pss-score")
    for key in ("probe", "positions"):
        vals = sorted({str(r[key]) for r in rows})
        if len(vals) > 1:
            logger.warning("the runs differ in %s (%s): their numbers are not directly comparable", key,
                           ", ".join(vals))
    corr = correlations(rows, accuracy, bootstrap, seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the output directory ({e.strerror or e})") from None
    rundir.write_text(out / "compare.csv", rundir.csv_text(COLUMNS, (["" if r[c] is None else r[c] for c in COLUMNS]
                                                                     for r in rows)))
    result = {"runs": rows, "correlations": corr, "accuracy": accuracy, "pss_score": used[0] if used else None,
              "bootstrap": bootstrap}
    rundir.write_json(out / "compare.json", result)
    _scatter(rows, accuracy, out / "compare.png")
    f = lambda v: "n/a" if not _finite(v) else (f"{v:.4g}")  # noqa: E731
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]) if not isinstance(r[c], float) else f(r[c]))}</td>"
                                   for c in COLUMNS) + "</tr>" for r in rows)
    ci = lambda c: "n/a" if not c else f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    crs = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['n']}</td><td>{f(v['pearson'])}</td><td>{ci(v['pearson_ci'])}</td>"
                  f"<td>{f(v['pearson_p'])}</td><td>{f(v['spearman'])}</td><td>{ci(v['spearman_ci'])}</td>"
                  f"<td>{f(v['spearman_p'])}</td></tr>" for k, v in corr.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>specext compare</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}}</style></head><body><h1>specext: {len(rows)} runs compared</h1>
<h2>Correlation with accuracy ({html.escape(accuracy)})</h2><p>PSS score: {html.escape(str(result['pss_score']))}.
Intervals: 95% bootstrap over runs ({bootstrap} resamples); p: two-sided.</p><table><tr><th>pair</th><th>n</th><th>Pearson r</th>
<th>95% interval</th><th>p</th><th>Spearman rho</th><th>95% interval</th><th>p</th></tr>{crs}</table><img src="compare.png" style="max-width:100%">
<h2>Runs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in COLUMNS)}</tr>{trs}</table></body></html>"""
    rundir.write_text(out / "compare.html", doc)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specext.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories written by python -m specext.analyze")
    p.add_argument("--out", default="specext-compare", help="output directory")
    p.add_argument("--accuracy", default="mcq", choices=["mcq", "mcq_norm", "open"])
    p.add_argument("--pss-score", default=None, choices=list(SCORES),
                   help="PSS score to compare (default: the runs' headline score, which must agree)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of runs for correlation intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = compare(args.runs, Path(args.out), args.accuracy, args.pss_score, args.bootstrap, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ci = lambda c: "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    for k, v in res["correlations"].items():
        print(f"{k:28s} n={v['n']:<3d} pearson {v['pearson']:.3f}{ci(v['pearson_ci'])} (p={v['pearson_p']:.3g})  "
              f"spearman {v['spearman']:.3f}{ci(v['spearman_ci'])} (p={v['spearman_p']:.3g})")
    print(f"wrote {args.out}/compare.csv, compare.json, compare.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
