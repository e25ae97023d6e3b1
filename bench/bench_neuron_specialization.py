"""Benchmark ``specext.ops.neuron_specialization`` against the plain-torch baseline
(``specext.reference.neuron_specialization`` in float32: ``torch.sort`` for Gini,
``torch.special.entr`` for entropy) on (categories, neurons) mass matrices.

(525, 100000) is the target size of the issue; (8, 14336*32) is every MLP neuron of a
32-layer Llama-3-8B over 8 categories. On CPU, (525, 100000) is also timed at every
SIMD level the build offers.

    python bench/bench_neuron_specialization.py
    python bench/bench_neuron_specialization.py --quick --no-csv
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

import specext  # noqa: E402
from specext import ops, reference  # noqa: E402

BENCH = "neuron_specialization"
DEAD_COLUMNS = 8  # all-zero columns: the kernel's dead-neuron path must be in the timing

SHAPES = [(525, 100000), (8, 14336 * 32), (64, 100000), (1024, 50000)]
QUICK_SHAPES = [(525, 2000), (8, 4096), (64, 2000), (1024, 500)]


def make_mass(C: int, N: int, device: torch.device) -> torch.Tensor:
    """Random positive masses, skewed like real ones (``rand ** 2``), with dead columns."""
    g = torch.Generator(device).manual_seed(C * 7919 + N)
    mass = torch.rand((C, N), generator=g, dtype=torch.float32, device=device) ** 2
    dead = torch.randperm(N, generator=torch.Generator().manual_seed(N))[:DEAD_COLUMNS]
    mass[:, dead.to(device)] = 0
    return mass


def main(argv=None) -> None:
    p = h.make_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    kb = h.start_kernel_bench(args, f"{BENCH} ({'quick' if args.quick else 'default'})")
    device, bw, cpu, base_warmup, base_repeat = kb.device, kb.bw, kb.cpu, kb.base_warmup, kb.base_repeat
    simd_now = specext.build_info()["simd"] if cpu else None
    tag = f" simd={simd_now}" if cpu else ""

    rows = []
    sweep_base = None  # the baseline of the first shape, reused by the SIMD rows
    for i, (C, N) in enumerate(h.progress(shapes, desc=BENCH)):
        mass = make_mass(C, N, device)
        t_ours = h.time_fn(lambda: ops.neuron_specialization(mass), device=device)
        t_base = h.time_fn(
            lambda: reference.neuron_specialization(mass, dtype=torch.float32),
            warmup=base_warmup,
            repeat=base_repeat,
            device=device,
        )
        m = h.Measurement(BENCH, h.shape_str(mass.shape), "float32", f"dead={DEAD_COLUMNS}{tag}",
                          t_ours * 1e3, t_base * 1e3, mass.numel() * 4, bw.gbps)
        rows.append(m.as_row(simd=simd_now or "-"))
        if i == 0:
            sweep_base = t_base
        del mass

    if cpu:
        C, N = shapes[0]
        mass = make_mass(C, N, device)
        levels = specext.build_info()["simd_available"]
        try:
            for level in levels:
                specext.set_simd_level(level)
                t_ours = h.time_fn(lambda: ops.neuron_specialization(mass), device=device)
                m = h.Measurement(BENCH, h.shape_str(mass.shape), "float32",
                                  f"dead={DEAD_COLUMNS} simd={level} sweep", t_ours * 1e3,
                                  sweep_base * 1e3, mass.numel() * 4, bw.gbps)
                rows.append(m.as_row(simd=f"{level} (sweep)"))
        finally:
            specext.set_simd_level(simd_now)

    h.finish(
        args,
        device,
        rows,
        [
            ("shape", "C x N"),
            "simd",
            *h.RESULT_COLUMNS,
        ],
    )


if __name__ == "__main__":
    main()
