"""Benchmark ``specext.ops.category_accumulate`` against the plain-torch ``index_add_``
baseline (``specext.reference.category_accumulate`` in float32) on activation matrices
of real models' MLP widths (d_ff 11008 = Llama-2-7B, 14336 = Llama-3-8B / Mistral-7B,
18944 = Qwen2-7B).

    python bench/bench_category_accumulate.py            # representative subset
    python bench/bench_category_accumulate.py --full     # every d_ff x tokens x C x dtype
    python bench/bench_category_accumulate.py --quick --no-csv
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

from specext import ops, reference  # noqa: E402

BENCH = "category_accumulate"
RUN_LENGTH = 32  # tokens per label in the "grouped" layout, like a prompt of one category


@dataclass(frozen=True)
class Case:
    tokens: int
    d_ff: int
    dtype: str
    categories: int
    labels: str  # "random" (worst case for locality) or "grouped" (runs of RUN_LENGTH)


def cases_for(mode: str) -> List[Case]:
    if mode == "quick":
        shapes, c_bf16, other_dtypes = [(2048, 1024)], (8, 64, 1024), ("float32", "float16")
    elif mode == "full":
        shapes = [(t, n) for n in (11008, 14336, 18944) for t in (16384, 65536)]
        c_bf16, other_dtypes = (8, 64, 1024), ("float32", "float16")
    else:
        shapes = None
    out: List[Case] = []
    if shapes is not None:
        for t, n in shapes:
            for c in c_bf16:
                out += _with_layouts(t, n, "bfloat16", c)
            for dt in other_dtypes:
                out += _with_layouts(t, n, dt, 64)
        return out
    # Default: a subset that runs in a few minutes on a 2-core CPU, where each torch
    # baseline call on (16384, 11008) takes most of a second.
    for c in (8, 64, 1024):
        out += _with_layouts(16384, 11008, "bfloat16", c)
    for dt in ("float32", "float16"):
        out += _with_layouts(16384, 11008, dt, 64)
    out += _with_layouts(65536, 14336, "bfloat16", 64)
    out += _with_layouts(16384, 18944, "bfloat16", 64)
    return out


def _with_layouts(t: int, n: int, dtype: str, c: int) -> List[Case]:
    layouts = ("random", "grouped") if c == 64 else ("random",)
    return [Case(t, n, dtype, c, lay) for lay in layouts]


def make_labels(case: Case, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + case.categories)
    if case.labels == "random":
        lab = torch.randint(0, case.categories, (case.tokens,), generator=g)
    else:
        runs = -(-case.tokens // RUN_LENGTH)
        lab = torch.randint(0, case.categories, (runs,), generator=g).repeat_interleave(RUN_LENGTH)[: case.tokens]
    return lab.to(device)


def make_acts(tokens: int, d_ff: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(tokens * 31 + d_ff)
    return torch.randn((tokens, d_ff), generator=g, dtype=dtype, device=device)


def baseline_peak_bytes(acts: torch.Tensor) -> int:
    # reference: acts[keep] copies acts, .to(float32) converts, .abs() allocates another
    # float32 copy; at most two of those live at once.
    return acts.numel() * (acts.element_size() + 8)


def main(argv=None) -> None:
    p = h.make_parser(__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the full matrix of shapes, C and dtypes")
    p.add_argument("--stat", default="abs", choices=ops.STATS)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    cases = cases_for(mode)
    kb = h.start_kernel_bench(args, f"{BENCH} ({mode}, stat={args.stat})")
    device, bw, cpu, base_warmup, base_repeat = kb.device, kb.bw, kb.cpu, kb.base_warmup, kb.base_repeat

    rows = []
    acts_key, acts = None, None
    for case in h.progress(cases, desc=BENCH):
        key = (case.tokens, case.d_ff, case.dtype)
        if key != acts_key:  # cases are grouped by shape and dtype: generate acts once each
            acts = None
            acts = make_acts(case.tokens, case.d_ff, h.DTYPES[case.dtype], device)
            acts_key = key
        labels = make_labels(case, device)
        C, N = case.categories, case.d_ff
        # Accumulate into preallocated buffers so neither side pays for allocating and
        # zeroing the (C, N) result; the values keep growing across repeats, which is fine.
        sums = torch.zeros((C, N), dtype=torch.float32, device=device)
        counts = torch.zeros((C,), dtype=torch.float32, device=device)

        def ours():
            ops.category_accumulate(acts, labels, C, stat=args.stat, sums=sums, counts=counts)

        def base():
            reference.category_accumulate(
                acts, labels, C, stat=args.stat, sums=sums, counts=counts, dtype=torch.float32
            )

        t_ours = h.time_fn(ours, device=device)
        if baseline_peak_bytes(acts) > 0.9 * h.available_memory_bytes(device):
            t_base = None
        else:
            t_base = h.time_fn(base, warmup=base_warmup, repeat=base_repeat, device=device)
        m = h.Measurement(
            bench=BENCH,
            shape=h.shape_str(acts.shape),
            dtype=case.dtype,
            extra=f"C={C} labels={case.labels}" + ("" if args.stat == "abs" else f" stat={args.stat}"),
            ours_ms=t_ours * 1e3,
            baseline_ms=None if t_base is None else t_base * 1e3,
            bytes_read=acts.numel() * acts.element_size(),
            bw_gbps=bw.gbps,
        )
        rows.append(m.as_row(C=C, labels=case.labels))
        del sums, counts, labels
    acts = None

    h.finish(
        args,
        device,
        rows,
        [
            ("shape", "tokens x d_ff"),
            "dtype",
            "C",
            "labels",
            *h.RESULT_COLUMNS,
        ],
    )


if __name__ == "__main__":
    main()
