#!/usr/bin/env python
"""The paper's causal fine-tuning experiment on the held-out concepts of the synthetic world.

Runs ``python -m specext.finetune --demo --strategy all`` (FT-FV, FT-PV, FT-CV, FT-RV on the
held-out model's 12 never-seen concepts, equal steps / learning rate / batch for all) over
several seeds, then writes what it shows to ``docs/results/causal/``:

- ``results.csv``, ``results.json``, ``results.html``, ``results.png``: finetune's own
  strategy x metric table (the original model first; means and standard deviations over seeds);
- ``comparison.csv``: for every metric, FT-PV against each other strategy: the difference of
  the means, each side's standard deviation over seeds, Welch's t and its two-sided p-value
  (seeds are the only replication; the selection of FV/PV/CV is deterministic, the seed changes
  the data order, the initial noise and FT-RV's random set);
- ``README.md``: the table and, per metric, whether FT-PV's difference from each other
  strategy is larger than the spread over seeds (|difference| > the sum of the two standard
  deviations, and p < 0.05), stated whatever the outcome.

The experiment itself is not tuned toward the paper's result: the defaults of
``specext.finetune`` are used unchanged, apart from ``--seeds`` and ``--no-save-model``.

    .venv/bin/python scripts/reproduce_causal.py                 # 5 seeds (~10 min on 2 cores)
    .venv/bin/python scripts/reproduce_causal.py --seeds 3 --work /tmp/causal
    .venv/bin/python scripts/reproduce_causal.py -- --steps 100  # extra finetune options after --
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))  # this checkout even if specext is not installed

from specext.metrics.correlation import betainc  # noqa: E402

STRATEGIES = ("fv", "pv", "cv", "rv")
LABELS = {"fv": "FT-FV", "pv": "FT-PV", "cv": "FT-CV", "rv": "FT-RV"}
# Direction in which a metric is better (None: no better direction, e.g. LID).
BETTER = {"trained_mcq": +1, "trained_mcq_norm": +1, "trained_open": +1, "trained_se": -1, "control_mcq": +1,
          "control_mcq_norm": +1, "control_open": +1, "control_se": -1}


def welch(a: Sequence[float], b: Sequence[float]) -> Dict[str, Optional[float]]:
    """Welch's two-sample t-test: difference of means (a - b), t, degrees of freedom and the
    two-sided p-value. ``p`` is None where either side has fewer than two values, or where
    neither side varies and the means differ (the test is undefined: every seed gives the
    same two values, so the seeds say nothing about how large a difference chance makes);
    1.0 where neither varies and the means are equal."""
    a, b = [x for x in a if x is not None and math.isfinite(x)], [x for x in b if x is not None and math.isfinite(x)]
    out = {"diff": None, "sd_a": None, "sd_b": None, "t": None, "df": None, "p": None}
    if not a or not b:
        return out
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    out["diff"] = ma - mb
    if len(a) < 2 or len(b) < 2:
        return out
    # equal values have no spread (the sum of squares of their mean's rounding error is not one)
    va = 0.0 if min(a) == max(a) else sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = 0.0 if min(b) == max(b) else sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    out["sd_a"], out["sd_b"] = math.sqrt(va), math.sqrt(vb)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        out["p"] = 1.0 if ma == mb else None
        return out
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    out["t"], out["df"] = t, df
    out["p"] = betainc(df / 2, 0.5, df / (df + t * t))
    return out


def per_seed(results: dict) -> Dict[str, Dict[str, List[float]]]:
    """metric -> strategy -> the values over seeds, from finetune's results.json."""
    keys = [m["key"] for m in results["metrics"]]
    vals: Dict[str, Dict[str, List[float]]] = {k: {s: [] for s in STRATEGIES} for k in keys}
    for rec in results["runs"]:
        table = rec["evaluation"]["table"]
        for k in keys:
            v = table.get(k)
            if v is not None:
                vals[k][rec["strategy"]].append(float(v))
    return vals


def holm(ps: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the
    family): the m tests sorted by p, the i-th (from 0) multiplied by m - i, made monotone
    and capped at 1. Controls the chance of any false claim in the family at the level."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    m = len(idx)
    out: List[Optional[float]] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def comparisons(results: dict) -> List[Dict[str, object]]:
    """FT-PV against each other strategy on every metric: Welch's test over seeds, with the
    p-values Holm-adjusted over the whole family of comparisons; a comparison exceeds the
    spread when |difference| > sd(FT-PV) + sd(other) and the adjusted p < 0.05."""
    vals = per_seed(results)
    rows = []
    for m in results["metrics"]:
        k = m["key"]
        for other in ("fv", "cv", "rv"):
            w = welch(vals[k]["pv"], vals[k][other])
            if w["diff"] is None:
                continue
            rows.append({"metric": k, "label": m["label"], "versus": LABELS[other], "pv_minus_other": w["diff"],
                         "sd_pv": w["sd_a"], "sd_other": w["sd_b"], "welch_t": w["t"], "df": w["df"], "p": w["p"]})
    for r, p_adj in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = p_adj
        spread = (r["sd_pv"] or 0.0) + (r["sd_other"] or 0.0)
        r["beyond_spread"] = (r["sd_pv"] is not None and abs(r["pv_minus_other"]) > spread and p_adj is not None
                              and p_adj < 0.05)
        sign = BETTER.get(r["metric"])
        if r["p"] is None and r["sd_pv"] is not None and r["pv_minus_other"] != 0:
            r["verdict"] = "no test (no spread over seeds)"
        elif not r["beyond_spread"]:
            r["verdict"] = "no clear difference"
        elif sign is None:
            r["verdict"] = "FT-PV higher" if r["pv_minus_other"] > 0 else "FT-PV lower"
        else:
            r["verdict"] = "FT-PV better" if r["pv_minus_other"] * sign > 0 else "FT-PV worse"
    return rows


def unchanged(results: dict, tol: float = 0.01) -> List[str]:
    """The strategies whose every trained-concept metric lies within ``max(tol, 2 sd)`` of the
    original model's: training left the model essentially as it was on the trained concepts,
    so their "better" or "worse" against another strategy is the original model's."""
    table = {r["key"]: r for r in results["table"]}
    orig = table.get("original") or {}
    keys = [m["key"] for m in results["metrics"] if m["key"].startswith("trained_")]
    out = []
    for s in STRATEGIES:
        row = table.get(s)
        if row is None:
            continue
        same = True
        for k in keys:
            v, o, sd = row.get(k), orig.get(k), row.get(k + "_std") or 0.0
            if v is None or o is None:
                continue
            if abs(v - o) > max(tol * max(1.0, abs(o)), 2 * sd):
                same = False
                break
        if same:
            out.append(LABELS[s])
    return out


COMPARISON_COLUMNS = ("metric", "label", "versus", "pv_minus_other", "sd_pv", "sd_other", "welch_t", "df", "p",
                      "p_holm", "beyond_spread", "verdict")


def comparison_csv(comp: List[Dict[str, object]]) -> str:
    """``comparison.csv``: one row per comparison, through specext's one CSV writer."""
    from specext.pipelines.rundir import csv_text

    return csv_text(COMPARISON_COLUMNS, (["" if c[k] is None else c[k] for k in COMPARISON_COLUMNS] for c in comp))


def _f(v, nd=3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def readme(results: dict, comp: List[Dict[str, object]], seeds: int, seconds: float, cmd: str) -> str:
    metrics = results["metrics"]
    head = "| model | " + " | ".join(m["label"] for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for row in results["table"]:
        cells = []
        for m in metrics:
            v, s = row.get(m["key"]), row.get(m["key"] + "_std")
            cells.append(_f(v) + ("" if s is None else f" ± {_f(s)}"))
        lines.append(f"| {row['strategy']} ({row['vectors']} vectors) | " + " | ".join(cells) + " |"
                     if row["key"] != "original" else "| original | " + " | ".join(cells) + " |")
    sel = results["selection"]
    beyond = [c for c in comp if c["beyond_spread"]]
    out = [
        "# Causal fine-tuning on the held-out concepts (FT-FV / FT-PV / FT-CV / FT-RV)",
        "",
        f"Made by `scripts/reproduce_causal.py` ({seeds} seeds, {seconds / 60:.1f} min on "
        f"{platform.machine()} with {platform.python_version()}): `{cmd}`.",
        "",
        f"Model: the held-out model (`specext.pipelines.demo_models`), trained on the synthetic world without "
        f"{len(results['concepts'])} concepts ({', '.join(results['concepts'])}); their facts are the training text. "
        f"Control set: {results['control_questions']} questions of other concepts (forgetting). Selection: ratio "
        f"{sel['ratio']:g}% ({sel['ratio_source']}), k = {sel['k']}, FT-PV = the top {sel['n_pv']} "
        f"(k x {sel['pv_fraction']:g}) by the trained concepts' summed differential score; FT-RV = {sel['n_pv']} "
        "random; FT-CV = the rest; FT-FV = all.",
        "",
        "Means ± standard deviations over seeds (the original model: one evaluation).",
        "",
        *lines,
        "",
        "Notes from the run: " + " ".join(results.get("notes") or []),
        "",
        "## What it shows",
        "",
        "FT-PV against each other strategy, per metric: the difference of the means and whether it is larger "
        "than the spread over seeds (|difference| > sd(FT-PV) + sd(other) and Welch's p, Holm-adjusted over all "
        f"{sum(c['p'] is not None for c in comp)} tested comparisons, < 0.05). The seeds are the only source of "
        "variance: the trained and control questions are fixed, so the tests say whether a difference is larger "
        "than the training's randomness, not whether it would hold on other questions. Where neither strategy "
        "varies over seeds and their means differ, there is no test. `comparison.csv` has every number.",
        "",
        "| metric | versus | FT-PV − other | sd FT-PV | sd other | p | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comp:
        out.append(f"| {c['label']} | {c['versus']} | {_f(c['pv_minus_other'])} | {_f(c['sd_pv'])} | "
                   f"{_f(c['sd_other'])} | {_f(c['p'], 4)} | {_f(c['p_holm'], 4)} | {c['verdict']} |")
    still = unchanged(results)
    if still:
        out += ["", f"**{', '.join(still)} left the model essentially unchanged on the trained concepts**: every "
                "trained-concept metric is within max(1%, 2 sd over seeds) of the original model's. Where such a "
                "strategy looks better than another (e.g. a lower semantic entropy), it is the original model's "
                "value, not a sign that the strategy stored the facts with less hallucination."]
    out += ["", f"{len(beyond)} of {len(comp)} comparisons exceed the spread over seeds."]
    if beyond:
        out.append("They are: " + "; ".join(f"{c['label']} vs {c['versus']} ({c['verdict']})" for c in beyond) + ".")
    out += ["", "With this few seeds a comparison that does not exceed the spread is not evidence of equality "
            "either; the paper's claim (FT-PV stores new knowledge better and hallucinates less) is supported "
            "here only where the table above says so.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "specext-runs" / "causal",
                    help="finetune's output directory (per-run subfolders; resumable)")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "causal")
    ap.add_argument("--fresh", action="store_true", help="start --work over instead of resuming it")
    args = ap.parse_args(argv)

    from specext.pipelines import finetune

    cmd = ["--demo", "--strategy", "all", "--seeds", str(args.seeds), "--no-save-model", "--out", str(args.work),
           *extra]
    if args.work.exists() and not args.fresh:
        cmd.append("--resume")
    elif args.work.exists():
        shutil.rmtree(args.work)
    t0 = time.time()
    rc = finetune.main(cmd)
    if rc:
        return rc
    # wall time over every invocation that worked on --work (a resumed run adds to it)
    timing = args.work / "reproduce_seconds.json"
    before = json.loads(timing.read_text())["seconds"] if timing.exists() and "--resume" in cmd else 0.0
    seconds = before + time.time() - t0
    timing.write_text(json.dumps({"seconds": seconds}))
    results = json.loads((args.work / "results.json").read_text())
    comp = comparisons(results)
    args.results.mkdir(parents=True, exist_ok=True)
    for name in ("results.csv", "results.json", "results.html", "results.png"):
        if (args.work / name).exists():
            shutil.copyfile(args.work / name, args.results / name)
    (args.results / "comparison.csv").write_text(comparison_csv(comp))
    shown_args = [a for a in argv if a != "--fresh"]
    shown = ".venv/bin/python scripts/reproduce_causal.py " + " ".join(shown_args + (["--", *extra] if extra else []))
    (args.results / "README.md").write_text(readme(results, comp, args.seeds, seconds, shown.strip()))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
