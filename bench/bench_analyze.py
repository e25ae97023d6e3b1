"""Analysis-pipeline benchmarks (the analyze issue's targets):

1. capture overhead: the scoring pass with and without streaming the MLP statistics
   (same run, same batches), multiple choice only and with open-ended generation;
2. memory: peak RSS of ``python -m specext.analyze`` with 1x and 4x the questions
   (the same concepts, each question repeated with a variant suffix), each in its own
   process. The accumulators are O(concepts x layers x d_ff), so peak RSS must not grow.

    python bench/bench_analyze.py                 # the shipped demo model + synthetic probe
    python bench/bench_analyze.py --model DIR --probe world --max-concepts 50
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

from specext.analyze import DEMO_MODEL  # noqa: E402
from specext.models import load_model  # noqa: E402
from specext.probes import Question, load_probe, write_jsonl  # noqa: E402
from specext.probes.scoring import PromptStats, Scorer  # noqa: E402
from specext.metrics.specialization import ConceptMass  # noqa: E402


def capture_overhead(args, device):
    """The scoring pass with and without the statistics, each batch timed both ways right
    next to each other (which goes first alternates by batch and round): per batch the
    median over rounds of the difference, summed (``h.paired_excess``), over the same sum of
    the plain batches; 95% interval by bootstrap over rounds. Subtracting whole runs instead
    left several percent of this VM's drift on a difference of a few percent."""
    lm = load_model(args.model, device=str(device), dtype=args.dtype)
    probe = load_probe(args.probe, max_concepts=args.max_concepts)
    qs = probe.questions[: args.questions] if args.questions else probe.questions
    batches = [qs[i : i + args.batch_size] for i in range(0, len(qs), args.batch_size)]
    rows = []
    for open_ended in (False, True):
        scorer = Scorer(lm, open_ended=open_ended)
        mass = ConceptMass(len(probe.concepts), lm.n_layers, lm.d_ff, device=lm.device)
        stats = PromptStats(lm.n_layers, lm.d_ff)

        def plain(b):
            scorer.score(b)

        def captured(b):
            scorer.score(b, stats=stats)
            mass.add(torch.tensor([probe.concept_index(q) for q in b], device=lm.device), stats.sums)

        def timed(call) -> float:
            return h.time_fn(call, warmup=0, repeat=1, device=device, flush_l2=False) * 1e3

        for b in batches[:2]:  # warm-up
            plain(b)
            captured(b)
        own, base = [], []
        for r in range(args.repeat):
            o, p = h.time_pairs(len(batches), r, lambda i: captured(batches[i]), lambda i: plain(batches[i]), timed)
            own.append(o)
            base.append(p)

        def overhead(k=None):
            return h.paired_excess(own, base, k) / h.paired_total(base, k)

        lo, hi = h.bootstrap(overhead, args.repeat)
        tp, tc = h.paired_total(base), h.paired_total(own)
        rows.append({"bench": "capture_overhead", "shape": f"{len(qs)} questions", "dtype": str(lm.dtype).replace("torch.", ""),
                     "extra": f"{'mcq+open' if open_ended else 'mcq'} batch={args.batch_size} L={lm.n_layers} d_ff={lm.d_ff} "
                              f"paired_overhead={overhead():.4f} ci95={lo:.4f}..{hi:.4f}",
                     "baseline_ms": tp, "ours_ms": tc, "ratio": tc / tp,
                     "overhead": f"{100 * overhead():+.1f}% ({100 * lo:+.1f}..{100 * hi:+.1f}%)"})
    return rows


def peak_rss_run(args, probe_path: Path, out: Path) -> tuple:
    cmd = [sys.executable, "-m", "specext.analyze", args.model, "--probe", str(probe_path), "--out", str(out),
           "--device", args.device if args.device != "auto" else "cpu", "--batch-size", str(args.batch_size), "-q",
           "--no-report", "--no-pss"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    if status != 0:
        raise RuntimeError(f"analyze failed ({status}): {err[-2000:]}")
    return ru.ru_maxrss / 1024.0, wall  # ru_maxrss is KiB on Linux


def memory(args):
    probe = load_probe(args.probe, max_concepts=args.max_concepts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for mult in (1, 4):
            qs = []
            for k in range(mult):
                suffix = "" if k == 0 else f" (variant {k})"
                qs += [Question(q.concept, q.category, q.question + suffix, q.choices, q.answer, q.tier, q.aliases, q.facts)
                       for q in probe.questions]
            p = tmp / f"probe{mult}.jsonl"
            write_jsonl(qs, p)
            rss, wall = peak_rss_run(args, p, tmp / f"run{mult}")
            results[mult] = rss
            rows.append({"bench": "analyze_peak_rss", "shape": f"{len(qs)} questions, {len(probe.concepts)} concepts",
                         "extra": f"{mult}x", "peak_rss_mib": rss, "wall_s": wall})
        growth = results[4] / results[1] - 1
        for r in rows:
            r["growth_4x_vs_1x"] = f"{100 * growth:+.1f}%"
    return rows


def main():
    p = h.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="model directory (default: the shipped demo model)")
    p.add_argument("--probe", default="synthetic")
    p.add_argument("--max-concepts", type=int, default=None)
    p.add_argument("--questions", type=int, default=None, help="score only the first N questions (overhead part)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.questions, args.repeat = args.questions or 64, 3
    device = h.resolve_device(args.device)
    h.seed_all(0)
    h.start("analyze pipeline: capture overhead and peak memory", device)
    rows = capture_overhead(args, device)
    h.print_table(rows, ["shape", "dtype", "extra", "baseline_ms", "ours_ms", "overhead"])
    print("\n(baseline = scoring without capture; ours = the same with per-neuron statistics streamed out; each "
          "batch timed both ways next to each other, per batch the median over rounds, summed; overhead = the "
          "summed paired difference over the baseline, with its 95% bootstrap interval over rounds)\n")
    if not args.skip_memory:
        mem = memory(args)
        h.print_table(mem, ["shape", "extra", "peak_rss_mib", "wall_s", "growth_4x_vs_1x"])
        rows += mem
    if not args.no_csv:
        h.append_csv(args.csv, rows, device=device)
        print(f"\nappended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
