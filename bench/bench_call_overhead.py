"""Per-call cost of ``specext.ops.category_accumulate`` at the sizes a forward hook sees
(one call per layer per batch), where Python overhead weighs as much as the kernel.

Three ways, measured in the same run: the public function (plain tensors go straight to
the kernel), the same kernel through torch's dispatcher (``torch.ops.specext``, the path
under ``torch.compile`` and for tensor subclasses), and the plain-torch baseline
(``specext.reference.category_accumulate``, ``index_add_``). Unchecked mode (``errors=``),
as the pipeline's hooks call it. On CUDA also the public function with the launcher's
token chunks fixed at 256 (``SPECEXT_CUDA_CHUNK=256``, the length before the launcher sized
chunks to the GPU).

    python bench/bench_call_overhead.py            # CPU or CUDA (auto)
    python bench/bench_call_overhead.py --quick --no-csv
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

from specext import ops, reference  # noqa: E402

BENCH = "call_overhead"
# (tokens, d_ff, categories): a tiny call (pure overhead), the demo's hook (16 prompts x 40
# tokens, d_ff 512), a 1B model's hook (16 prompts x 128 tokens, d_ff 8192).
SHAPES = [(8, 64, 4), (640, 512, 16), (2048, 8192, 16)]


def main(argv=None) -> None:
    p = h.make_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = h.resolve_device(args.device)
    h.seed_all(0)
    bw = h.start(f"{BENCH}: category_accumulate per call, unchecked mode", device)
    repeat = 50 if args.quick else 300
    rows = []
    for T, N, C in SHAPES[:2] if args.quick else SHAPES:
        g = torch.Generator().manual_seed(T + N)
        acts = torch.randn(T, N, generator=g).to(torch.bfloat16).to(device)
        labels = torch.randint(-1, C, (T,), generator=g).to(device)
        weights = torch.rand(T, generator=g).to(device)
        sums = torch.zeros(C, N, device=device)
        counts = torch.zeros(C, device=device)
        errors = torch.zeros(3, dtype=torch.int64, device=device)

        def public():
            ops.category_accumulate(acts, labels, weights=weights, sums=sums, counts=counts, errors=errors)

        def dispatcher():
            torch.ops.specext.category_accumulate_unchecked_(acts, labels, weights, sums, counts, errors, "abs")

        def base():
            reference.category_accumulate(acts, labels, C, weights=weights, sums=sums, counts=counts,
                                          dtype=torch.float32)

        # CPU: wall time of one call (what the hook costs the forward pass); CUDA: events.
        t_pub = h.time_fn(public, warmup=20, repeat=repeat, device=device, flush_l2=False)
        t_disp = h.time_fn(dispatcher, warmup=20, repeat=repeat, device=device, flush_l2=False)
        t_base = h.time_fn(base, warmup=5, repeat=max(20, repeat // 10), device=device, flush_l2=False)
        t_fixed = None
        if device.type == "cuda":  # the launcher's adaptive chunks against the former fixed 256 tokens
            os.environ["SPECEXT_CUDA_CHUNK"] = "256"
            try:
                t_fixed = h.time_fn(public, warmup=20, repeat=repeat, device=device, flush_l2=False)
            finally:
                del os.environ["SPECEXT_CUDA_CHUNK"]
        m = h.Measurement(BENCH, h.shape_str((T, N)), "bfloat16", f"C={C}", t_pub * 1e3, t_base * 1e3,
                          acts.numel() * acts.element_size(), bw.gbps)
        rows.append(m.as_row(us=t_pub * 1e6, disp_us=t_disp * 1e6, base_us=t_base * 1e6,
                             disp_ratio=t_disp / t_pub, fixed_us=None if t_fixed is None else t_fixed * 1e6))
    h.finish(args, device, rows, [("shape", "tokens x d_ff"), ("extra", "C"), ("us", "public us"),
                                  ("disp_us", "dispatcher us"), ("disp_ratio", "dispatcher/public"),
                                  ("base_us", "torch us"), ("ratio", "torch/public")]
             + ([("fixed_us", "256-token chunks us")] if device.type == "cuda" else []))


if __name__ == "__main__":
    main()
