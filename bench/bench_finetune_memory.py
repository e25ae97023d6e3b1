"""Peak training memory of causal fine-tuning: FT-PV (the top k/8 value vectors) against
FT-FV (every value vector), on a random Llama of about 1B parameters (issue 11's target:
FT-PV at most 60% of FT-FV).

    python bench/bench_finetune_memory.py                 # hidden 2048, d_ff 5632, 22 layers (~1.1B), float32
    python bench/bench_finetune_memory.py --quick         # hidden 256, d_ff 688, 4 layers
    python bench/bench_finetune_memory.py --layers 8      # a smaller model of the same width

Each strategy runs in its own process (``--worker``), built the same way: the seeded random
model (transformers' default init, the demo tokenizer; scripts/gpu_check.py's 1B shape),
the training examples (the facts of two synthetic concepts), the selection (FT-PV: the
top ``round(k / 8)`` of random scores, ``k`` the vectors at ``--ratio`` percent; FT-FV:
all), then :func:`specext.pipelines.finetune.finetune_deltas` for ``--steps`` steps. The
*baseline* is the process's resident set just before training (model, tokenizer, data);
*peak* is the resident-set high-water mark (``VmHWM``, reset to the baseline before
training; ``torch.cuda.max_memory_allocated`` on CUDA) at the end of training. The ratio is
peak(FT-PV) / peak(FT-FV); the growth over the baseline is printed too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

TARGET = 0.60
STRATEGIES = ("pv", "fv")


def worker(args) -> None:
    from bench_peers import _memory_peak, _memory_start, large_llama

    from specext.pipelines import finetune as ft
    from specext.pipelines import training
    from specext.probes.probeset import load_probe

    device = torch.device(args.device)
    dtype = h.DTYPES[args.dtype]
    t0 = time.perf_counter()
    lm = large_llama(args.hidden, args.d_ff, args.layers, device=device, dtype=dtype, seed=0)
    build_s = time.perf_counter() - t0
    probe = load_probe("synthetic")
    texts = ft.training_texts(probe, probe.concepts[:2])
    examples = training.encode_texts(lm.tokenizer, texts)
    L, D = lm.n_layers, lm.d_ff
    scores = torch.rand(L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k, n_pv = ft.pv_count(args.ratio, L, D, args.pv_fraction)
    selected = ft.select(args.worker, scores, n_pv, seed=0)
    cfg = training.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, seed=0, log_every=10 ** 9)
    baseline, reset = _memory_start(device)
    t1 = time.perf_counter()
    _, res = ft.finetune_deltas(lm, examples, selected, cfg, progress=False)
    train_s = time.perf_counter() - t1
    peak = _memory_peak(device)
    out = {"strategy": args.worker, "parameters": sum(p.numel() for p in lm.model.parameters()),
           "vectors": int(selected.sum()), "of": L * D, "k": k, "trained_parameters": res.n_trained_parameters,
           "optimizer_state_mib": res.optimizer_state_bytes / 2 ** 20, "baseline_mib": baseline, "peak_mib": peak,
           "peak_reset": reset, "build_s": build_s, "train_s": train_s, "final_loss": res.final_loss}
    Path(args.result).write_text(json.dumps(out))


def main() -> None:
    p = h.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--dtype", default="float32", choices=list(h.DTYPES))
    p.add_argument("--ratio", type=float, default=10.0,
                   help="k = the vectors at this percent (10: PSS's largest default ratio, the largest FT-PV)")
    p.add_argument("--pv-fraction", type=float, default=0.125)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.d_ff, args.layers = 256, 688, 4
    device = h.resolve_device(args.device)
    args.device = device.type
    if args.worker:
        return worker(args)
    h.start("finetune memory: peak training memory of FT-PV vs FT-FV", device)
    print(f"model:        random Llama hidden {args.hidden}, d_ff {args.d_ff}, {args.layers} layers, {args.dtype}; "
          f"{args.steps} steps of batch {args.batch_size}; FT-PV = top round(k x {args.pv_fraction:g}) with k at "
          f"{args.ratio:g}% of the vectors\n")
    import tempfile

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in STRATEGIES:
            res = Path(tmp) / f"{s}.json"
            cmd = [sys.executable, __file__, "--worker", s, "--result", str(res), "--device", args.device,
                   "--hidden", str(args.hidden), "--d-ff", str(args.d_ff), "--layers", str(args.layers),
                   "--dtype", args.dtype, "--ratio", str(args.ratio), "--pv-fraction", str(args.pv_fraction),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"worker {s} failed ({r.returncode}):\n{r.stderr[-4000:]}")
            rows[s] = json.loads(res.read_text())
    table = []
    for s in STRATEGIES:
        x = rows[s]
        table.append({"strategy": f"FT-{s.upper()}", "params": f"{x['parameters'] / 1e9:.2f}B",
                      "vectors": f"{x['vectors']} of {x['of']}", "trained": f"{x['trained_parameters'] / 1e6:.1f}M",
                      "opt": f"{x['optimizer_state_mib']:.0f}", "base": f"{x['baseline_mib']:.0f}",
                      "peak": f"{x['peak_mib']:.0f}", "growth": f"{x['peak_mib'] - x['baseline_mib']:.0f}",
                      "train_s": f"{x['train_s']:.1f}"})
    h.print_table(table, [("strategy", "strategy"), ("params", "model"), ("vectors", "trained vectors"),
                          ("trained", "trained params"), ("opt", "optimizer MiB"), ("base", "baseline MiB"),
                          ("peak", "peak MiB"), ("growth", "growth MiB"), ("train_s", "train s")])
    pv, fv = rows["pv"], rows["fv"]
    ratio = pv["peak_mib"] / fv["peak_mib"]
    growth = (pv["peak_mib"] - pv["baseline_mib"]) / max(1e-9, fv["peak_mib"] - fv["baseline_mib"])
    mem = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print(f"\n{mem}: FT-PV / FT-FV = {ratio:.3f} (target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'NOT met'}); "
          f"growth over the baseline FT-PV / FT-FV = {growth:.3f}")
    if not all(r["peak_reset"] for r in rows.values()):
        print("note: the high-water mark could not be reset (no /proc/self/clear_refs): peaks include model building")


if __name__ == "__main__":
    main()
