"""Benchmark ``specext.ops.value_vector_norms`` (L2 norm of every column of a
down-projection) against the plain-torch baseline (``specext.reference.value_vector_norms``
in float32: ``torch.linalg.vector_norm(weight.float(), dim=0)``).

Weights: Llama-2-7B's down_proj (4096, 11008), Llama-2/3-70B's (8192, 28672), and GPT-2's
c_proj (768, 3072), both row-major and as GPT-2 stores it (Conv1D keeps (3072, 768), so
the (d_model, d_ff) view is a transpose that the kernel reads in place).

    python bench/bench_value_vector_norms.py
    python bench/bench_value_vector_norms.py --quick --no-csv
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

from specext import ops, reference  # noqa: E402

BENCH = "value_vector_norms"


@dataclass(frozen=True)
class Case:
    d_model: int
    d_ff: int
    dtype: str
    layout: str  # "row-major" (d_model, d_ff) contiguous, or "transposed" (Conv1D's .t())


def cases_for(quick: bool):
    big = [(256, 1024), (512, 2048)] if quick else [(4096, 11008), (8192, 28672)]
    out = []
    for dm, dff in big:
        for dt in ("bfloat16", "float32"):
            out.append(Case(dm, dff, dt, "row-major"))
    for dt in ("bfloat16", "float32"):
        for layout in ("row-major", "transposed"):
            out.append(Case(768, 3072, dt, layout))
    return out


def make_weight(case: Case, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(case.d_model * 131 + case.d_ff)
    dtype = h.DTYPES[case.dtype]
    if case.layout == "transposed":
        stored = torch.randn((case.d_ff, case.d_model), generator=g, dtype=dtype, device=device)
        return stored.t()
    return torch.randn((case.d_model, case.d_ff), generator=g, dtype=dtype, device=device)


def main(argv=None) -> None:
    p = h.make_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    kb = h.start_kernel_bench(args, f"{BENCH} ({'quick' if args.quick else 'default'})")
    device, bw, cpu, base_warmup, base_repeat = kb.device, kb.bw, kb.cpu, kb.base_warmup, kb.base_repeat

    rows = []
    for case in h.progress(cases_for(args.quick), desc=BENCH):
        w = make_weight(case, device)
        t_ours = h.time_fn(lambda: ops.value_vector_norms(w), device=device)
        t_base = h.time_fn(
            lambda: reference.value_vector_norms(w, dtype=torch.float32),
            warmup=base_warmup,
            repeat=base_repeat,
            device=device,
        )
        m = h.Measurement(BENCH, h.shape_str(w.shape), case.dtype, f"layout={case.layout}",
                          t_ours * 1e3, t_base * 1e3, w.numel() * w.element_size(), bw.gbps)
        rows.append(m.as_row(layout=case.layout))
        del w

    h.finish(
        args,
        device,
        rows,
        [
            ("shape", "d_model x d_ff"),
            "dtype",
            "layout",
            *h.RESULT_COLUMNS,
        ],
    )


if __name__ == "__main__":
    main()
