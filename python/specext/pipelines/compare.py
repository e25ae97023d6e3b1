"""``python -m specext.compare RUN_DIR... [--out DIR]``: one row per analysed model,
Pearson and Spearman correlations of peak PSS, mean Gini and mean excess Gini with accuracy
(the paper's headline figure: PSS vs SpecWiki accuracy over 20 models), written as
``compare.csv``, ``compare.json`` and ``compare.html`` with a scatter plot.

Every run's peak PSS comes with its 95% bootstrap interval over concepts (from its
``summary.json``); every correlation with its two-sided p-value and a 95% bootstrap interval
over runs. ``--pss-score paper|delta`` picks the score; by default the runs' own headline
score, which must then be the same for every run.

Runs are labelled by their directory's name (with parent folders where two names are the
same). ``compare.json`` is strict JSON: an undefined correlation (fewer than 3 runs, a
constant accuracy or metric) is ``null`` with a ``reason``. Runs that differ in probe,
question or concept counts, positions, mass statistic or PSS settings are compared with a
warning, and the differing settings are listed (``differing_settings``, ``warnings``).

Each model must count once: a correlation across models over n runs assumes n independent
models, and a model counted twice inflates n and the significance. Two runs are the same
model when they are the same directory (given twice, or through a link) or when they
analysed the same weights (``config.json``'s ``fingerprint.weights_sha256``, the hash of the
safetensors files' names and bytes, so a copied run directory or the same checkpoint stored
under two paths is caught, and a fine-tune of it is not). Same weights with a different probe
or different options is still the same model: two points of one model would still weigh it
twice. Such runs are an error naming them and what they share, unless
``--allow-duplicate-models`` is given (then a warning in ``warnings``). Runs without a weights
hash (no ``config.json``, or an older specext's) are checked by path only, with a warning.

p-values are exact permutation tests (all n! orderings) for n <= 9 and for Spearman's
|rho| = 1, else the t approximation; ``pearson_p_method`` / ``spearman_p_method`` say which
(:mod:`specext.metrics.correlation`).
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
from specext._options import DefaultsFormatter, at_least, one_of
from specext.metrics.bootstrap import bootstrap_correlation
from specext.metrics.correlation import EXACT_MAX_N, pearson_test, spearman_test

logger = logging.getLogger("specext.compare")

COLUMNS = ["label", "run", "model", "architecture", "parameters", "mcq", "mcq_norm", "open", "pss_score", "peak_pss",
           "peak_pss_ci_low", "peak_pss_ci_high", "peak_ratio", "pss_floor", "mean_gini", "mean_gini_null",
           "mean_excess_gini", "share_above_null", "twin_mean_gini", "twin_mean_excess_gini", "gini_over_twin",
           "excess_gini_over_twin", "mean_norm_entropy", "probe", "questions", "positions"]
METRICS = ("peak_pss", "mean_gini", "mean_excess_gini")
# summary.json's pss keys that change what a run's PSS measures (pss_ratios, pss_concepts... in compare.json)
PSS_SETTINGS = ("ratios", "concepts", "control_questions", "unrelated", "selection", "denominator", "metric")
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
        "settings": _settings(Path(run_dir), s),
        "weights_sha256": (run_fingerprint(Path(run_dir)) or {}).get("weights_sha256"),
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


def run_fingerprint(run_dir: Path) -> Optional[Dict[str, object]]:
    """``config.json``'s ``fingerprint`` (what ``analyze --resume`` checks: ``options``,
    ``weights_sha256``, ``model_config_sha256``, ``probe_sha256``, ``questions``); None where
    the run directory has no readable config.json or no fingerprint in it."""
    fp = (rundir.json_dict(Path(run_dir) / "config.json") or {}).get("fingerprint")
    return fp if isinstance(fp, dict) else None


def _flat(d, path: str = "") -> Dict[str, object]:
    """A nested dict as ``{"options.pss.ratios": value, ...}``."""
    if not isinstance(d, dict):
        return {path: d}
    out: Dict[str, object] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{path}.{k}" if path else str(k)))
    return out


def duplicate_models(rows: List[Dict[str, object]], fingerprints: List[Optional[Dict[str, object]]]) -> List[str]:
    """One message per group of runs that are the same model and must not count as separate
    models: a run directory given more than once (the same resolved path) and distinct run
    directories whose ``fingerprints`` (:func:`run_fingerprint`) have the same
    ``weights_sha256``, whatever their probe or options. Each message names the run
    directories (as given) and what they share; empty where every run is a model of its own."""
    msgs: List[str] = []
    by_path: Dict[Path, List[int]] = {}
    for i, r in enumerate(rows):
        by_path.setdefault(Path(r["run"]).resolve(), []).append(i)
    for path, idx in by_path.items():
        if len(idx) > 1:
            spelled = sorted({rows[i]["run"] for i in idx})
            msgs.append(f"{rows[idx[0]]['run']} is given {len(idx)} times"
                        + (f" (as {', '.join(spelled)}, all {path})" if len(spelled) > 1 else ""))
    by_weights: Dict[str, List[int]] = {}
    for idx in by_path.values():  # one run per directory
        w = (fingerprints[idx[0]] or {}).get("weights_sha256")
        if isinstance(w, str) and w:
            by_weights.setdefault(w, []).append(idx[0])
    for w, idx in by_weights.items():
        if len(idx) < 2:
            continue
        models = sorted({str(rows[i].get("model")) for i in idx})
        flat = [{k: v for k, v in _flat(fingerprints[i]).items() if k != "weights_sha256"} for i in idx]
        keys = sorted({k for f in flat for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
        what = (" with the same probe and options too (copies of one run)" if not differ else
                f" (they differ only in {', '.join(differ)}: still one model)")
        msgs.append(f"{', '.join(rows[i]['run'] for i in idx)} analysed the same model weights (weights_sha256 "
                    f"{w[:16]}..., model {' / '.join(models)}){what}")
    return msgs


def _settings(run_dir: Path, s: Dict[str, object]) -> Dict[str, object]:
    """The options that make two runs' numbers comparable or not: the probe, its size, the token
    positions, the mass statistic and the PSS settings (``config.json``'s where summary.json
    does not say)."""
    probe = s.get("probe") or {}
    pss = s.get("pss") or {}
    try:
        opts = json.loads((run_dir / "config.json").read_text()).get("options") or {}
    except (OSError, ValueError, AttributeError):
        opts = {}
    out = {"probe": probe.get("name"), "questions": probe.get("questions"), "concepts": probe.get("concepts"),
           "positions": s.get("positions"), "stat": opts.get("stat")}
    if not pss:
        out["pss"] = "off"
        return out
    for k in PSS_SETTINGS:
        out[f"pss_{k}"] = pss.get(k)
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _strict(o):
    """``o`` with every non-finite float as ``None``: compare.json is strict JSON (a bare NaN
    is rejected by strict parsers); where a value is missing for a reason, a field says why."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    return o


def run_labels(run_dirs: List[str]) -> List[str]:
    """Each run's label: its directory's name; where two runs' names are the same, as many
    parent folders as tell them apart (``a/run``, ``b/run``); the same directory given again is
    ``name (2)``, ``name (3)``..."""
    paths = [Path(d).resolve() for d in run_dirs]
    parts = [p.parts[1:] or (str(p),) for p in paths]  # without the anchor ("/")
    depth = [1] * len(paths)
    lab = lambda i: "/".join(parts[i][len(parts[i]) - depth[i]:])  # noqa: E731
    changed = True
    while changed:
        changed = False
        groups: Dict[str, List[int]] = {}
        for i in range(len(paths)):
            groups.setdefault(lab(i), []).append(i)
        for g in groups.values():
            if len({paths[i] for i in g}) > 1:
                for i in g:
                    if depth[i] < len(parts[i]):
                        depth[i] += 1
                        changed = True
    out, seen = [], {}
    for i, p in enumerate(paths):
        seen[p] = seen.get(p, 0) + 1
        out.append(lab(i) if seen[p] == 1 else f"{lab(i)} ({seen[p]})")
    return out


def _undefined(x: List[float], y: List[float], metric: str, accuracy: str) -> Optional[str]:
    """Why a correlation of ``x`` with ``y`` over runs is undefined (None: it is defined)."""
    if len(x) < 3:
        return f"fewer than 3 runs with both {metric} and {accuracy} accuracy ({len(x)})"
    if len(set(y)) == 1:
        return f"constant accuracy: {accuracy} is {y[0]:.4f} in every run"
    if len(set(x)) == 1:
        return f"constant {metric}: {x[0]:.4f} in every run"
    return None


def correlations(rows: List[Dict[str, object]], accuracy: str = "mcq", bootstrap: int = 1000,
                 seed: int = 0) -> Dict[str, object]:
    """Pearson and Spearman correlation of each metric with accuracy over runs, with two-sided
    p-values and 95% bootstrap intervals (runs resampled with replacement). Each p-value's
    method is next to it (``pearson_p_method``, ``spearman_p_method``): ``exact permutation``
    (all n! orderings, for n <= ``EXACT_MAX_N``, and Spearman's |rho| = 1 at any n) or
    ``t approximation`` (:mod:`specext.metrics.correlation`). Where a correlation is undefined
    (fewer than 3 runs, a constant accuracy or metric) its numbers and methods are ``None``
    and ``reason`` says why; otherwise ``reason`` is ``None``."""
    out = {}
    for metric in METRICS:
        pairs = [(r[metric], r[accuracy]) for r in rows if _finite(r.get(metric)) and _finite(r.get(accuracy))]
        x, y = [p[0] for p in pairs], [p[1] for p in pairs]
        reason = _undefined(x, y, metric, accuracy)
        pr = pp = pm = sr = sp = sm = None
        b = {"pearson_ci": None, "spearman_ci": None, "resamples_used": 0}
        if reason is None:
            pr, pp, pm = pearson_test(x, y)
            sr, sp, sm = spearman_test(x, y)
            if not all(map(_finite, (pr, pp, sr, sp))):
                reason = "undefined (a non-finite correlation)"
            b = bootstrap_correlation(x, y, bootstrap, seed)
        out[f"{metric}_vs_{accuracy}"] = _strict(
            {"n": len(pairs), "pearson": pr, "pearson_p": pp, "pearson_p_method": pm, "pearson_ci": b["pearson_ci"],
             "spearman": sr, "spearman_p": sp, "spearman_p_method": sm, "spearman_ci": b["spearman_ci"],
             "bootstrap_resamples": b["resamples_used"], "reason": reason})
    return out


def differing_settings(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, object]]:
    """``{setting: {label: value}}`` for every setting whose value is not the same in every run
    (the probe, its question and concept counts, positions, the mass statistic, PSS settings)."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r["settings"] if k not in keys]
    out = {}
    for k in keys:
        vals = {r["label"]: r["settings"].get(k) for r in rows}
        if len({json.dumps(v, sort_keys=True) for v in vals.values()}) > 1:
            out[k] = vals
    return out


def _scatter(rows, accuracy, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, metric, label in zip(axes, METRICS, ("peak PSS (95% interval)", "mean Gini", "mean excess Gini")):
        pts = [(r[metric], r[accuracy], r["label"], r) for r in rows
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


def fmt_count(n) -> str:
    """A parameter count as people write it: 1.1M, 124M, 7.2B."""
    if not _finite(n):
        return "n/a"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(int(n))


def fmt_num(v) -> str:
    """Every score, accuracy and ratio of compare's tables: four decimals (1.0000 beside 0.2121)."""
    return f"{v:.4f}" if _finite(v) else "n/a"


# The runs table of compare.html: (header, cell) over a row; the CSV and JSON keep every column.
def _cells(r) -> List[tuple]:
    ci = (f"\n[{fmt_num(r['peak_pss_ci_low'])}, {fmt_num(r['peak_pss_ci_high'])}]"
          if _finite(r.get("peak_pss_ci_low")) and _finite(r.get("peak_pss_ci_high")) else "")
    ratio = r.get("peak_ratio")
    return [("run", r["label"]), ("model", Path(str(r["model"])).name if r.get("model") else "n/a"),
            ("architecture", r.get("architecture") or "n/a"), ("parameters", fmt_count(r.get("parameters"))),
            ("mcq", fmt_num(r.get("mcq"))), ("mcq norm", fmt_num(r.get("mcq_norm"))), ("open", fmt_num(r.get("open"))),
            ("peak PSS [95%]", fmt_num(r.get("peak_pss")) + ci),
            ("at ratio", f"{ratio:g}%" if _finite(ratio) else "n/a"), ("PSS floor", fmt_num(r.get("pss_floor"))),
            ("mean Gini", fmt_num(r.get("mean_gini"))), ("null Gini", fmt_num(r.get("mean_gini_null"))),
            ("excess Gini", fmt_num(r.get("mean_excess_gini"))), ("above null", fmt_num(r.get("share_above_null"))),
            ("twin Gini", fmt_num(r.get("twin_mean_gini"))), ("twin excess", fmt_num(r.get("twin_mean_excess_gini"))),
            ("Gini / twin", fmt_num(r.get("gini_over_twin"))),
            ("excess / twin", fmt_num(r.get("excess_gini_over_twin"))),
            ("norm. entropy", fmt_num(r.get("mean_norm_entropy")))]  # the settings (probe...) are listed apart


def _html(rows, corr, result, accuracy: str, bootstrap: int) -> str:
    e = lambda v: html.escape(str(v))  # noqa: E731
    ci = lambda c: "n/a" if not c else f"[{c[0]:.4f}, {c[1]:.4f}]"  # noqa: E731
    short = {"exact permutation": "exact", "t approximation": "t"}
    p = lambda v, m: "n/a" if not _finite(v) else f"{v:.3g} ({e(short.get(m, m))})"  # noqa: E731
    crs = "".join(f"<tr><td>{e(k)}</td><td>{v['n']}</td>" + (
        f"<td>{fmt_num(v['pearson'])}</td><td>{ci(v['pearson_ci'])}</td><td>{p(v['pearson_p'], v['pearson_p_method'])}"
        f"</td><td>{fmt_num(v['spearman'])}</td><td>{ci(v['spearman_ci'])}</td>"
        f"<td>{p(v['spearman_p'], v['spearman_p_method'])}</td><td></td>"
        if v["reason"] is None else f"<td colspan=6 class=c>n/a</td><td class=l>{e(v['reason'])}</td>") + "</tr>"
        for k, v in corr.items())
    head = "".join(f"<th>{e(h)}</th>" for h, _ in _cells(rows[0]))
    cell = lambda c: "<br>".join(map(e, c.split("\n"))) if "\n" in c else e(c)  # noqa: E731 (the interval below)
    trs = "".join(f'<tr title="{e(r["run"])}">' + "".join(f"<td>{cell(c)}</td>" for _, c in _cells(r)) + "</tr>"
                  for r in rows)
    diff = result["differing_settings"]
    warn = ""
    if diff:
        dh = "".join(f"<th>{e(k)}</th>" for k in diff)
        dr = "".join(f"<tr><td>{e(r['label'])}</td>" + "".join(f"<td>{e(_setting(diff[k][r['label']]))}</td>"
                                                                 for k in diff) + "</tr>" for r in rows)
        warn = (f'<div class="warn"><b>The runs differ in {e(", ".join(diff))}</b>: their numbers are not directly '
                f'comparable.<div class="scroll"><table><tr><th>run</th>{dh}</tr>{dr}</table></div></div>')
    others = [w for w in result["warnings"] if not w.startswith("the runs differ in ")]  # duplicates, unchecked
    if others:
        warn = ('<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{e(w)}</li>" for w in others)
                + "</ul></div>" + warn)
    same = [(k, v) for k, v in rows[0]["settings"].items() if k not in diff]
    common = ("<p>Settings common to every run: " + "; ".join(f"{e(k)} <b>{e(_setting(v))}</b>" for k, v in same)
              + ".</p>") if same else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>specext compare</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1600px;margin:2em auto;padding:0 1em;color:#222}}
p{{max-width:1100px}}table{{border-collapse:collapse;font-size:.9em}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td{{white-space:nowrap}}
th{{background:#f3f3f3}}td.l{{text-align:left}}td.c{{text-align:center}}.scroll{{overflow-x:auto;max-width:100%;margin:.5em 0 1.5em}}
.warn{{background:#fff4e0;border:1px solid #e0a040;padding:.5em 1em;margin:1em 0}}
img{{max-width:100%}}</style></head><body><h1>specext: {len(rows)} runs compared</h1>{warn}
<h2>Correlation with accuracy ({e(accuracy)})</h2><p>PSS score: {e(result['pss_score'])}.
Intervals: 95% bootstrap over runs ({bootstrap} resamples); p: two-sided, <i>exact</i>: an exact
permutation test over all n! orderings (n &le; {EXACT_MAX_N}, and Spearman's |rho| = 1), <i>t</i>: the t
approximation.</p><div class="scroll"><table><tr><th>pair</th>
<th>n</th><th>Pearson r</th><th>95% interval</th><th>p</th><th>Spearman rho</th><th>95% interval</th><th>p</th><th>note</th>
</tr>{crs}</table></div><img src="compare.png" alt="compare.png">
<h2>Runs</h2><p>Labelled by run directory (hover a row for its path); every column, unrounded, is in
<code>compare.csv</code> and <code>compare.json</code>.</p>{common}<div class="scroll"><table><tr>{head}</tr>{trs}</table></div>
</body></html>"""


def _setting(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return str(v)


def compare(run_dirs: List[str], out: Path, accuracy: str = "mcq", score: Optional[str] = None,
            bootstrap: int = 1000, seed: int = 0, allow_duplicate_models: bool = False) -> Dict[str, object]:
    """Compare finished ``analyze`` run directories and write ``compare.csv``, ``compare.json``,
    ``compare.png`` and ``compare.html`` into ``out``; returns compare.json's content.

    Raises ValueError, naming the runs and what they share, where two runs are the same model
    (the same directory, or the same weights by ``config.json``'s ``fingerprint.weights_sha256``,
    even with a different probe or options: see :func:`duplicate_models`) unless
    ``allow_duplicate_models`` (``--allow-duplicate-models``), which counts them all and
    records a warning."""
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
    for r, lab in zip(rows, run_labels(run_dirs)):
        r["label"] = lab
    warnings = []
    dups = duplicate_models(rows, [run_fingerprint(Path(d)) for d in run_dirs])
    if dups and not allow_duplicate_models:
        raise ValueError("the same model would count more than once in the correlations across models, inflating "
                         f"n and their significance: {'; '.join(dups)}. Give each model once, or pass "
                         "--allow-duplicate-models to count every run (recorded as a warning)")
    for d in dups:
        warnings.append(f"{d}: counted as separate models (--allow-duplicate-models), so n overstates the number of "
                        "models and the p-values and intervals overstate the evidence")
        logger.warning("%s", warnings[-1])
    unchecked = [r["run"] for r in rows if not r["weights_sha256"]]
    if unchecked and len(rows) > 1:
        warnings.append(f"{', '.join(unchecked)}: no fingerprint.weights_sha256 in config.json (not written by "
                        "specext.analyze, or by an older version): whether another run analysed the same model "
                        "weights was not checked (only the directories' paths were)")
        logger.warning("%s", warnings[-1])
    used = sorted({r["pss_score"] for r in rows if r["pss_score"]})
    if len(used) > 1:
        raise ValueError(f"the runs' headline PSS scores differ ({', '.join(used)}); choose one with --pss-score")
    diff = differing_settings(rows)
    for k, vals in diff.items():
        warnings.append(f"the runs differ in {k} ({'; '.join(f'{lab}: {_setting(v)}' for lab, v in vals.items())}): "
                        f"their numbers are not directly comparable")
        logger.warning("%s", warnings[-1])
    corr = correlations(rows, accuracy, bootstrap, seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the output directory ({e.strerror or e})") from None
    rows = _strict(rows)
    rundir.write_text(out / "compare.csv", rundir.csv_text(COLUMNS, (["" if r[c] is None else r[c] for c in COLUMNS]
                                                                     for r in rows)))
    result = _strict({"runs": rows, "correlations": corr, "accuracy": accuracy,
                      "pss_score": used[0] if used else None, "bootstrap": bootstrap,
                      "differing_settings": diff, "warnings": warnings})
    rundir.write_text(out / "compare.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    _scatter(rows, accuracy, out / "compare.png")
    rundir.write_text(out / "compare.html", _html(rows, corr, result, accuracy, bootstrap))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specext.compare", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=DefaultsFormatter)
    p.add_argument("runs", nargs="+", help="run directories written by python -m specext.analyze")
    p.add_argument("--out", default="specext-compare", help="output directory (compare.csv, compare.json, compare.html)")
    p.add_argument("--accuracy", default="mcq", choices=["mcq", "mcq_norm", "open"],
                   help="the accuracy the scores are correlated with")
    p.add_argument("--pss-score", default=None, choices=list(SCORES),
                   help="PSS score to compare (default: the runs' headline score, which must agree)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of runs for correlation intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--allow-duplicate-models", action="store_true",
                   help="count runs of the same model (the same run directory, or the same weights_sha256 in "
                        "config.json, whatever the probe or options) as separate points, with a warning; by default "
                        "that is an error, as it inflates n and the significance")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = compare(args.runs, Path(args.out), args.accuracy, args.pss_score, args.bootstrap, args.seed,
                      allow_duplicate_models=args.allow_duplicate_models)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ci = lambda c: "" if not c else f" [{c[0]:.4f}, {c[1]:.4f}]"  # noqa: E731
    for k, v in res["correlations"].items():
        if v["reason"] is not None:
            print(f"{k:28s} n={v['n']:<3d} no correlation: {v['reason']}")
            continue
        print(f"{k:28s} n={v['n']:<3d} pearson {v['pearson']:.4f}{ci(v['pearson_ci'])} "
              f"(p={v['pearson_p']:.3g}, {v['pearson_p_method']})  spearman {v['spearman']:.4f}"
              f"{ci(v['spearman_ci'])} (p={v['spearman_p']:.3g}, {v['spearman_p_method']})")
    print(f"wrote {args.out}/compare.csv, compare.json, compare.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
