#!/usr/bin/env python
"""Specialisation over training (issue 11, item 6): the paper's OLMo-2 checkpoint study, in
miniature.

Trains the synthetic-world model from scratch (the demo model's recipe and seed, so its last
checkpoint is the demo model) saving checkpoints at chosen steps, runs ``specext.analyze``
(:func:`specext.analyze.run_analysis`) on each, and plots against the training step:
multiple-choice and open-ended accuracy, peak PSS (the paper's score and the
baseline-corrected delta, with their bootstrap 95% intervals over concepts), mean Gini of
the neurons with the permutation null's mean, and the mean excess Gini over the null. The
spread: PSS intervals from the analysis's bootstrap, and for Gini the standard deviation
over neurons and the range over layers.

``--checkpoints DIR`` analyses an existing directory of checkpoint directories instead of
training (e.g. OLMo's intermediate checkpoints downloaded as ``DIR/stepNNNN/``; the step is
read from a ``step`` number in each directory's name, else the directories are taken in
name order and numbered 0, 1, ...). Use ``--probe world`` for real models.

Writes ``--results`` (default ``docs/results/pretraining_dynamics``): ``dynamics.csv``,
``dynamics.png`` and ``run.json`` (options, timings, which analyses were reused); the checkpoints and the analysis run
directories go to ``--work`` (default ``specext-runs/pretraining_dynamics``), where a
finished analysis (its ``summary.json``) is reused unless ``--force``.

    python scripts/pretraining_dynamics.py                        # the committed run
    python scripts/pretraining_dynamics.py --checkpoints ~/olmo2-ckpts --probe world --device auto
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (docs/DESIGN-NOTES.md, Threads)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))  # use this checkout even if specext is not installed

logger = logging.getLogger("specext.pretraining_dynamics")

DEFAULT_STEPS = (25, 50, 100, 200, 400, 800)
COLUMNS = ("step", "checkpoint", "acc_mcq", "acc_mcq_norm", "acc_open",
           "pss_paper_peak", "pss_paper_peak_lo", "pss_paper_peak_hi", "pss_paper_peak_ratio",
           "pss_paper_random_peak", "pss_paper_random_peak_lo", "pss_paper_random_peak_hi",
           "pss_delta_peak", "pss_delta_peak_lo", "pss_delta_peak_hi", "pss_delta_peak_ratio",
           "pss_delta_random_peak", "pss_delta_random_peak_lo", "pss_delta_random_peak_hi",
           "pss_floor", "pss_overall_accuracy",
           "mean_gini", "sd_gini", "mean_gini_null", "mean_excess_gini", "sd_excess_gini",
           "mean_gini_layer_min", "mean_gini_layer_max", "mean_excess_gini_layer_min", "mean_excess_gini_layer_max",
           "share_above_null", "dead_neurons", "pss_concepts", "analysis_seconds")


def checkpoint_step(name: str) -> Optional[int]:
    """The training step in a checkpoint directory's name: the number after ``step`` (OLMo's
    ``stage1-step1000-tokens5B``, ``step-00100``, ``step_100``), else None."""
    m = re.search(r"step[-_]?(\d+)", name, flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


def find_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """``(step, directory)`` of every subdirectory of ``root`` with a config.json, ordered by
    step (directories without a step number: in name order, numbered by position)."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
    if not dirs:
        raise SystemExit(f"error: {root} holds no checkpoint directories (subdirectories with a config.json)")
    steps = [checkpoint_step(p.name) for p in dirs]
    if all(s is not None for s in steps):
        if len(set(steps)) != len(steps):
            raise SystemExit(f"error: {root}: two checkpoint directories name the same step")
        return sorted(zip(steps, dirs))
    logger.warning("%s: not every checkpoint name has a step number; using name order", root)
    return list(enumerate(dirs))


def train_checkpoints(work: Path, steps: Sequence[int], seed: int, total: int, threads: int) -> List[Tuple[int, Path]]:
    """Train the demo model's recipe for ``total`` steps, saving ``work/checkpoints/step-NNNNN``
    at ``steps`` (reused when all are there)."""
    from specext.pipelines import demo_models
    from specext.probes import synthetic

    ck = work / "checkpoints"
    want = [(s, ck / f"step-{s:05d}") for s in steps]
    if all((d / "model.safetensors").is_file() for _, d in want):
        logger.info("reusing the checkpoints in %s", ck)
        return want
    world = synthetic.generate_world(seed)
    t0 = time.perf_counter()
    demo_models.train_synthetic_model(world, work / "final", seed=seed, steps=total, threads=threads,
                                      evaluate=False, progress=False, checkpoint_steps=steps, checkpoint_dir=ck)
    logger.info("trained %d steps with %d checkpoints in %.0fs", total, len(steps), time.perf_counter() - t0)
    return want


def analyse(model_dir: Path, out: Path, args) -> dict:
    from specext.analyze import AnalyzeConfig, run_analysis
    from specext.metrics.pss import PSSConfig

    if (out / "summary.json").is_file() and not args.force:
        logger.info("reusing %s", out)
        return json.loads((out / "summary.json").read_text())
    cfg = AnalyzeConfig(model_dir=str(model_dir), probe=args.probe, out=str(out), device=args.device, dtype=args.dtype,
                        batch_size=args.batch_size, seed=args.seed, report=False,
                        null_permutations=args.null_permutations,
                        pss_config=PSSConfig(concepts=args.pss_concepts, control_size=args.pss_control,
                                             bootstrap=args.bootstrap, seed=args.seed))
    return run_analysis(cfg, progress=False)


def row_of(step: int, name: str, run: Path, summary: dict, seconds: float) -> Dict[str, object]:
    from safetensors.torch import load_file

    neurons = load_file(str(run / "neurons.safetensors"))
    gini, total = neurons["gini"].double(), neurons["total"].double()
    alive = total > 0
    row = {"step": step, "checkpoint": name, "analysis_seconds": summary.get("seconds", round(seconds, 1))}
    acc = summary.get("accuracy", {})
    row.update(acc_mcq=acc.get("mcq"), acc_mcq_norm=acc.get("mcq_norm"), acc_open=acc.get("open"))
    pss = summary.get("pss") or {}
    for kind in ("paper", "delta"):
        p = pss.get(kind) or {}
        ci = p.get("peak_ci") or [None, None]
        rci = p.get("random_peak_ci") or [None, None]
        row.update({f"pss_{kind}_peak": p.get("peak"), f"pss_{kind}_peak_lo": ci[0], f"pss_{kind}_peak_hi": ci[1],
                    f"pss_{kind}_peak_ratio": p.get("peak_ratio"), f"pss_{kind}_random_peak": p.get("random_peak"),
                    f"pss_{kind}_random_peak_lo": rci[0], f"pss_{kind}_random_peak_hi": rci[1]})
    row.update(pss_floor=pss.get("floor"), pss_overall_accuracy=pss.get("overall_accuracy"),
               pss_concepts=pss.get("concepts"))
    nsum = summary["neurons"]
    g = gini[alive]
    row.update(mean_gini=nsum["mean_gini"], sd_gini=g.std().item(), mean_gini_null=nsum.get("mean_gini_null"),
               mean_excess_gini=nsum.get("mean_excess_gini"), share_above_null=nsum.get("share_above_null"),
               dead_neurons=nsum.get("dead"))
    if "excess_gini" in neurons:
        row["sd_excess_gini"] = neurons["excess_gini"].double()[alive].std().item()
    layers = summary.get("layers", [])
    for key in ("mean_gini", "mean_excess_gini"):
        vals = [l[key] for l in layers if l.get(key) is not None]
        if vals:
            row[f"{key}_layer_min"], row[f"{key}_layer_max"] = min(vals), max(vals)
    return row


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.NullFormatter)

    steps = [r["step"] for r in rows]
    log = min(steps) > 0 and max(steps) / max(1, min(steps)) >= 8

    def col(k):
        return [float("nan") if r.get(k) is None else float(r[k]) for r in rows]

    fig, ax = plt.subplots(2, 2, figsize=(10, 7.5))
    a = ax[0, 0]
    a.plot(steps, col("acc_mcq"), "o-", label="multiple choice (acc)")
    a.plot(steps, col("acc_open"), "s-", label="open-ended")
    a.set_ylabel("accuracy")
    a.set_ylim(-0.02, 1.02)
    a.legend()
    a = ax[0, 1]
    for kind, mk, c in (("paper", "o-", "C0"), ("delta", "s--", "C1")):
        y, lo, hi = col(f"pss_{kind}_peak"), col(f"pss_{kind}_peak_lo"), col(f"pss_{kind}_peak_hi")
        err = [[max(0.0, v - l) for v, l in zip(y, lo)], [max(0.0, h - v) for v, h in zip(y, hi)]]
        a.errorbar(steps, y, yerr=err, fmt=mk, color=c, capsize=3, label=f"peak PSS ({kind}), 95% CI")
        a.plot(steps, col(f"pss_{kind}_random_peak"), "x:", color=c, alpha=0.6,
               label=f"same number of random vectors ({kind})")
    a.set_ylabel("PSS")
    a.legend(fontsize=8)
    a = ax[1, 0]
    y, sd = col("mean_gini"), col("sd_gini")
    a.plot(steps, y, "o-", label="mean Gini (band: ± sd over neurons)")
    a.fill_between(steps, [v - s for v, s in zip(y, sd)], [v + s for v, s in zip(y, sd)], alpha=0.15)
    a.plot(steps, col("mean_gini_null"), "x:", color="grey", label="permutation null (mean)")
    a.set_ylabel("Gini over categories")
    a.legend(fontsize=8)
    a = ax[1, 1]
    y = col("mean_excess_gini")
    a.plot(steps, y, "o-", label="mean excess Gini (band: layer range)")
    a.fill_between(steps, col("mean_excess_gini_layer_min"), col("mean_excess_gini_layer_max"), alpha=0.15)
    a.axhline(0, color="grey", lw=0.8)
    a.set_ylabel("excess Gini over the null")
    a.legend(fontsize=8)
    for a in ax.flat:
        a.set_xlabel("training step")
        if log:
            a.set_xscale("log")
            a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.set_xticks(steps)
        a.set_xticklabels([str(s) for s in steps])
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="analyse this directory of checkpoint directories instead of training")
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                    help="training steps to checkpoint (the last one is the length of training)")
    ap.add_argument("--seed", type=int, default=0, help="world, training and analysis seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (part of its determinism)")
    ap.add_argument("--probe", default="synthetic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pss-concepts", type=int, default=12, help="concepts PSS is evaluated on (seeded sample)")
    ap.add_argument("--pss-control", type=int, default=100, help="control questions of PSS")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--null-permutations", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / "specext-runs" / "pretraining_dynamics")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "pretraining_dynamics")
    ap.add_argument("--force", action="store_true", help="re-run analyses whose summary.json exists")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    lib = logging.getLogger("specext")
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)

    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    train_seconds = None
    if args.checkpoints is not None:
        ckpts = find_checkpoints(args.checkpoints)
        title = f"specext: specialisation over training, checkpoints of {args.checkpoints.name} ({args.probe} probe)"
    else:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
        if not steps or steps[0] < 1:
            raise SystemExit("error: --steps must be positive integers")
        t0 = time.perf_counter()
        ckpts = train_checkpoints(args.work, steps, args.seed, steps[-1], args.threads)
        train_seconds = round(time.perf_counter() - t0, 1)
        title = (f"specext: the synthetic-world model (demo recipe, seed {args.seed}) over {steps[-1]} training "
                 f"steps; PSS on {args.pss_concepts} concepts")
    rows, reused = [], []
    for step, d in ckpts:
        t0 = time.perf_counter()
        run = args.work / "runs" / d.name
        if (run / "summary.json").is_file() and not args.force:
            reused.append(d.name)
        summary = analyse(d, run, args)
        rows.append(row_of(step, d.name, run, summary, time.perf_counter() - t0))
        r = rows[-1]
        logger.info("step %d: acc %.3f, PSS paper %.3f delta %.3f, mean Gini %.4f, excess %.4f", step,
                    r["acc_mcq"] or 0, r["pss_paper_peak"] or 0, r["pss_delta_peak"] or 0, r["mean_gini"],
                    r["mean_excess_gini"] or 0)
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / "dynamics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    plot(rows, args.results / "dynamics.png", title)
    import torch

    meta = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("work", "results")},
            "checkpoints": [{"step": s, "dir": d.name} for s, d in ckpts],
            "torch_version": torch.__version__, "seconds": round(time.perf_counter() - t_start, 1),
            "training_seconds": train_seconds,
            "analysis_seconds": round(sum(float(r["analysis_seconds"] or 0) for r in rows), 1),
            "reused_analyses": reused}
    (args.results / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.results}/dynamics.csv, dynamics.png, run.json in {meta['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
