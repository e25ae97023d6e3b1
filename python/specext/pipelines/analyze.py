"""``python -m specext.analyze MODEL_DIR``: probe accuracy and per-neuron specialisation.

One pass over a knowledge probe gives the model's multiple-choice and open-ended
accuracy and, from the same forward passes, the category entropy and Gini of every MLP
neuron, their controls and the masking experiment (PSS). This module is the command line
only: everything it does is :func:`specext.pipelines.run.run_analysis` (re-exported here as
``specext.analyze.run_analysis`` with :class:`AnalyzeConfig`) for notebook use; the run
directory's files are described in :mod:`specext.pipelines.run`.
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin-wait by default; on virtual machines with pause-loop exiting
# that costs ~8 ms per parallel region (a tiny model's forward pass becomes 50x slower).
# The policy is read once when libgomp loads, so it must be set before torch is imported;
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from specext._deps import require

# matplotlib is only for the report: run_analysis requires it when the report is on, so that
# --no-report (and the library's own users) work without it.
require("torch", "transformers", "tokenizers", "tqdm", what="python -m specext.analyze")

from specext._options import number_list  # noqa: E402
from specext.metrics.pss import DENOMINATORS, PSSConfig, RANDOM_MATCH, RATIOS, REPORTED_SCORES, SCORES  # noqa: E402
from specext.pipelines.demo_models import DEMO_MODEL  # noqa: E402,F401  (public: specext.analyze.DEMO_MODEL)
from specext.pipelines.run import STATS, AnalyzeConfig, Specialisation, run_analysis, specialisation  # noqa: F401  (public)
from specext.probes.scoring import POSITIONS  # noqa: E402

# The demo evaluates PSS on a sample of concepts so that it stays within minutes on a CPU.
DEMO_PSS_CONCEPTS = 24

__all__ = ["AnalyzeConfig", "run_analysis", "main", "build_parser", "print_summary"]


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def print_summary(summary: Dict[str, object], out: Path, file=sys.stdout) -> None:
    a, n = summary["accuracy"], summary["neurons"]
    print(f"\nspecext: {summary['model']} ({summary['architecture']}) on probe '{summary['probe']['name']}' "
          f"({summary['probe']['questions']} questions, {summary['probe']['concepts']} concepts)", file=file)
    print(f"  accuracy      mcq {_fmt(a['mcq'])}   mcq_norm {_fmt(a['mcq_norm'])}   open {_fmt(a['open'])}", file=file)
    print(f"  neurons       {n['neurons']} ({n['dead']} dead)   mean Gini {_fmt(n['mean_gini'])}   "
          f"median Gini {_fmt(n['median_gini'])}   mean norm. entropy {_fmt(n['mean_norm_entropy'])}", file=file)
    if "mean_gini_null" in n:
        print(f"  null model    mean Gini under permuted categories {_fmt(n['mean_gini_null'])}   excess Gini "
              f"{_fmt(n['mean_excess_gini'])}   above the null's 99th percentile {_fmt(n['share_above_null'])} "
              f"(1% expected by chance)", file=file)
    tw = summary.get("random_twin")
    if tw:
        r = tw["model_over_twin"]
        print(f"  random twin   mean Gini {_fmt(tw['mean_gini'])}   excess Gini {_fmt(tw.get('mean_excess_gini'))}   "
              f"model/twin: Gini {_fmt(r['mean_gini'])}, excess {_fmt(r['mean_excess_gini'])}", file=file)
    has_null = "mean_excess_gini" in n
    print("  layer   mean Gini   >0.3   norm. entropy   dead" + ("   excess   >null" if has_null else ""), file=file)
    for l in summary["layers"]:
        extra = f"   {_fmt(l.get('mean_excess_gini')):>6}   {_fmt(l.get('share_above_null')):>5}" if has_null else ""
        print(f"  {l['layer']:>5}   {_fmt(l['mean_gini']):>9}   {_fmt(l['share_gini_above_0.3']):>5}   "
              f"{_fmt(l['mean_norm_entropy']):>13}   {l['dead']:>4}{extra}", file=file)
    print("  (>0.3: share of the layer's live neurons with Gini above 0.3" + (";" if has_null else ")"), file=file)
    if has_null:
        print("   excess: mean Gini minus its null; >null: share above the null's 99th percentile)", file=file)
    p = summary.get("pss")
    if p:
        def ci(c):
            return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"

        name = {"paper": "PSS (paper)", "delta": "PSS delta"}
        print(f"  {name[p['score']]:<13} peak {_fmt(p['peak'])}{ci(p['peak_ci'])} at {p['peak_ratio']}% of vectors "
              f"({p['concepts']} concepts, "
              f"{'95% bootstrap intervals' if p.get('bootstrap') else 'no intervals: --bootstrap 0'})", file=file)
        print(f"                floor (no mask) {_fmt(p['floor'])}{ci(p['floor_ci'])}", file=file)
        if p.get("peak_at_largest_ratio"):
            print(f"                (the peak is at the largest ratio tried, {max(p['ratios']):g}%: a larger one "
                  "might score higher; add ratios with --ratios)", file=file)
        for sc in [k for k in REPORTED_SCORES if isinstance(p.get(k), dict)]:
            b = p[sc]
            curve = "  ".join(f"{r:g}%:{v:+.3f}" if sc == "delta_signed" else f"{r:g}%:{v:.3f}"
                              for r, v in zip(p["ratios"], b["curve"]))
            print(f"  {sc:>13} {curve}", file=file)
            if b.get("random_curve"):
                rc = "  ".join(f"{r:g}%:{v:.3f}" for r, v in zip(p["ratios"], b["random_curve"]))
                print(f"  {'random':>13} {rc}", file=file)
    print(f"  run directory {out}  ({summary['seconds']} s)", file=file)


def build_parser() -> argparse.ArgumentParser:
    """The command line's options. Every option has help text that states its default once
    (``tests/test_cli_help.py`` holds it to that)."""
    p = argparse.ArgumentParser(
        prog="python -m specext.analyze", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Examples: python -m specext.analyze --demo;  python -m specext.analyze MODEL_DIR --probe world "
               "--out runs/mymodel. Each run writes one run directory (--out); see README.md.")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="local Hugging Face model directory (config.json, *.safetensors, tokenizer); required "
                        "unless --demo")
    p.add_argument("--demo", action="store_true",
                   help="analyse the shipped demo model (a tiny Llama) on the synthetic probe, into "
                        f"specext-runs/demo (replaced on every --demo run unless --out is given), with "
                        f"--pss-concepts {DEMO_PSS_CONCEPTS} and --random-twin")
    p.add_argument("--probe", default=None, metavar="PROBE",
                   help="world (198 real-world concepts), synthetic (the demo's world) or a JSONL probe file "
                        "(default: world; synthetic with --demo)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory; it must be empty, or hold a checkpoint of the same run with --resume, or "
                        "be replaced with --overwrite (default: specext-runs/MODEL-PROBE; specext-runs/demo with "
                        "--demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="clear --out first when it holds an earlier specext run (a folder of other files is never "
                        "deleted)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out from its last checkpoint")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype of the model's weights and computation; auto: the checkpoint's, except float32 for a "
                        "bfloat16/float16 checkpoint on a CPU without native arithmetic for it when float32 fits "
                        "in memory (default: auto)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="cpu, cuda, cuda:N, or auto: cuda when torch sees a GPU, else cpu (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="questions per forward pass, halved automatically on CUDA out-of-memory (default: 8)")
    p.add_argument("--max-concepts", type=int, default=None, metavar="N",
                   help="a seeded sample of N concepts, at least one per category (default: all)")
    p.add_argument("--positions", default="question", choices=list(POSITIONS),
                   help="tokens whose MLP coefficients form a prompt's statistic: the question's, the last "
                        "prompt token, all, the concept's name (subject) or its last token (default: question)")
    p.add_argument("--stat", default="abs", choices=list(STATS),
                   help="abs: mean |m|; contribution: |m| times the value-vector norm (default: abs)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of every sample: concepts, PSS control set, random controls, null model "
                        "(default: 0)")
    p.add_argument("--no-open", action="store_true", help="skip open-ended generation (multiple choice only)")
    p.add_argument("--max-new-tokens", type=int, default=12, metavar="N",
                   help="tokens generated for an open-ended answer (default: 12)")
    p.add_argument("--truncate", default=None, choices=["left"],
                   help="a prompt past the model's positions (with its options / --max-new-tokens): left cuts it "
                        "from the left, with a warning and a count in summary.json (default: an error naming the "
                        "question)")
    p.add_argument("--chunk-size", type=int, default=64, metavar="N",
                   help="questions per unit of work; checkpoints fall between chunks (default: 64)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, metavar="S",
                   help="seconds between checkpoints for --resume, 0: after every chunk (default: 300)")
    p.add_argument("--no-report", action="store_true", help="skip report.html and its plots")
    p.add_argument("--accumulate-device", default="auto", choices=["auto", "cpu"],
                   help="where the concept accumulators live: auto, the model's device (with --device-map: each "
                        "layer's device); cpu: host memory, for large models (default: auto)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="S",
                   help="under torchrun: seconds a rank waits for the others in the process group and its "
                        "collectives (default: 1800)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model directory's own Python code")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a checkpoint with only pickled *.bin weights (unpickling can run code)")
    p.add_argument("--allow-missing", action="store_true",
                   help="checkpoint tensors missing for the config's model, or left over, are a warning (recorded in "
                        "summary.json) instead of an error: for heads that are tied or unused")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display, warnings and errors only")
    g = p.add_argument_group("Parameter Specialization Score (PSS)")
    g.add_argument("--no-pss", action="store_true", help="skip the masking experiment")
    g.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS), metavar="R,R,...",
                   help="percent of all layers x d_ff value vectors to mask, comma-separated (default: "
                        + ",".join(f"{r:g}" for r in RATIOS) + ")")
    g.add_argument("--pss-concepts", type=int, default=None, metavar="N",
                   help="evaluate a seeded sample of N concepts, round-robin over categories (default: all; "
                        f"{DEMO_PSS_CONCEPTS} with --demo)")
    g.add_argument("--pss-unrelated", default="other", choices=["other", "same-category", "other-category"],
                   help="concepts whose mean mass is subtracted in the differential score (default: other)")
    g.add_argument("--pss-selection", default="global", choices=["global", "per-layer"],
                   help="mask the top vectors across all layers, or the top share of each layer (default: global)")
    g.add_argument("--pss-random-match", default="uniform", choices=list(RANDOM_MATCH),
                   help="the random control's vectors: uniform over all vectors (the paper's), or as many in each "
                        "layer as the concept's top vectors, a stricter control under global selection "
                        "(default: uniform)")
    g.add_argument("--pss-control", type=int, default=200, metavar="N",
                   help="control questions, of other concepts, at least one per category (default: 200)")
    g.add_argument("--pss-denominator", default="overall", choices=list(DENOMINATORS),
                   help="overall: the model's overall accuracy before masking (the paper's); general: the control "
                        "set's accuracy without a mask (default: overall)")
    g.add_argument("--pss-score", default="paper", choices=list(SCORES),
                   help="the headline score: paper |G - CS| / A (has a floor at ratio 0), or delta "
                        "|dG - dCS| / A (baseline-corrected); both are always written (default: paper)")
    g.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of concepts for the 95%% intervals, 0: none (default: 1000)")
    g.add_argument("--pss-metric", default="mcq", choices=["mcq", "mcq_norm"],
                   help="accuracy under a mask: mcq, lm-evaluation-harness acc (summed option log-likelihood), or "
                        "mcq_norm, its acc_norm per character (default: mcq)")
    g.add_argument("--no-random-control", action="store_true",
                   help="skip the control that masks as many random vectors")
    g.add_argument("--pss-batch-rows", type=int, default=256, metavar="N",
                   help="(question, mask) rows per masked forward pass (default: 256)")
    s = p.add_argument_group("specialisation controls")
    s.add_argument("--null-permutations", type=int, default=8, metavar="P",
                   help="null draws each neuron's Gini is standardised against in the Gini null model "
                        "(P + 1 random reassignments of concepts to categories are drawn), 0: off (default: 8)")
    s.add_argument("--random-twin", action="store_true", default=None,
                   help="also run the same architecture with seeded random weights on the same probe, a control "
                        "(default: on with --demo, off otherwise)")
    s.add_argument("--no-random-twin", dest="random_twin", action="store_false",
                   help="no random twin, also with --demo")
    m = p.add_argument_group("one model over several devices (accelerate)")
    m.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="split the model over the GPUs, the CPU and disk (transformers' device_map); --device auto "
                        "uses every GPU, --device cpu the CPU and disk only (default: off, the whole model on "
                        "--device)")
    m.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="per-device budget for --device-map, e.g. 0=20GiB,1=20GiB,cpu=100GiB or cpu=200MB "
                        "(default: what is free)")
    m.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="folder for layers that fit no device's budget, i.e. disk offload (default: none)")
    return p


def main(argv: Optional[List[str]] = None, *, on_checkpoint: Optional[Callable[[str, int], None]] = None) -> int:
    """The command line; ``on_checkpoint`` is passed to :func:`run_analysis`."""
    args = build_parser().parse_args(argv)
    # transformers stays quiet (no weight-loading bar) inside run_analysis, as in a notebook
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.demo:
        if args.model_dir:
            print("error: give either MODEL_DIR or --demo, not both", file=sys.stderr)
            return 2
        args.model_dir = str(DEMO_MODEL)
        args.probe = args.probe or "synthetic"
        if args.out is None:
            # the demo's own folder: a re-run replaces the previous demo run (unless --resume)
            args.out = str(Path("specext-runs") / "demo")
            args.overwrite = args.overwrite or not args.resume
    if not args.model_dir:
        print("error: MODEL_DIR is required (or --demo)", file=sys.stderr)
        return 2
    try:
        ratios = number_list("--ratios", args.ratios)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.demo and args.pss_concepts is None:
        args.pss_concepts = DEMO_PSS_CONCEPTS
    if args.random_twin is None:
        args.random_twin = bool(args.demo)  # seconds on the demo model; its report shows every control
    try:
        pss_cfg = PSSConfig(ratios=ratios, unrelated=args.pss_unrelated, selection=args.pss_selection,
                            control_size=args.pss_control, denominator=args.pss_denominator,
                            concepts=args.pss_concepts, metric=args.pss_metric,
                            random_control=not args.no_random_control, seed=args.seed,
                            batch_rows=args.pss_batch_rows, score=args.pss_score, bootstrap=args.bootstrap,
                            random_match=args.pss_random_match)
        cfg = AnalyzeConfig(
            model_dir=args.model_dir, probe=args.probe or "world", out=args.out, dtype=args.dtype,
            device=args.device, batch_size=args.batch_size, max_concepts=args.max_concepts, positions=args.positions,
            stat=args.stat, seed=args.seed, resume=args.resume, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle, allow_missing=args.allow_missing, open_ended=not args.no_open, max_new_tokens=args.max_new_tokens,
            chunk_size=args.chunk_size, checkpoint_every=args.checkpoint_every, report=not args.no_report,
            pss=not args.no_pss, pss_config=pss_cfg, null_permutations=args.null_permutations,
            random_twin=args.random_twin, accumulate_device=args.accumulate_device, device_map=args.device_map,
            max_memory=args.max_memory, offload_dir=args.offload_dir, dist_timeout=args.dist_timeout,
            truncate=args.truncate,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    who = f"rank {os.environ.get('RANK', '?')} of {world}: " if world > 1 else ""
    run = run_analysis
    if world > 1:  # torchrun: an uncaught error's traceback becomes the failure torchrun reports
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run_analysis)
    try:
        summary = run(cfg, progress=not args.quiet, on_checkpoint=on_checkpoint)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {who}{e}", file=sys.stderr)
        return 2
    except ImportError as e:  # a missing optional dependency (matplotlib for the report)
        print(f"error: {who}{e}" + (" (or pass --no-report)" if "matplotlib" in str(e) else ""), file=sys.stderr)
        return 2
    if world > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 prints the summary
    out = Path(cfg.out) if cfg.out else Path("specext-runs") / f"{Path(cfg.model_dir).name}-{summary['probe']['name']}"
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
