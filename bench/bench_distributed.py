"""Data parallel wall time: ``python -m specext.analyze --demo`` (with PSS) on one process
vs ``torchrun --standalone --nproc_per_node N`` on the same machine (gloo on the CPU).

    python bench/bench_distributed.py [--ranks 2] [--repeat 1] [-- EXTRA ANALYZE ARGS]

Prints each run's wall time (process start to exit, so torchrun's own start-up counts)
and the N-rank / 1-rank ratio (issue 10's target: <= 0.70 for two ranks). Both runs use
the same options; torchrun sets ``OMP_NUM_THREADS=1`` per rank, the single process uses
torch's default (one thread per core).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, env) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("extra", nargs="*", help="more analyze options (after --)")
    a = p.parse_args()
    import torch

    args = ["--demo", "-q", "--device", "cpu", *a.extra]
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"analyze {' '.join(args)}")
    one, many = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):
            one.append(_run([sys.executable, "-m", "specext.analyze", *args, "--out", f"{tmp}/one{i}"], env))
            many.append(_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(a.ranks), "-m", "specext.analyze", *args, "--out", f"{tmp}/many{i}"], env))
    b1, bn = min(one), min(many)
    print(f"1 rank   {b1:7.1f} s  (runs: {', '.join(f'{x:.1f}' for x in one)})")
    print(f"{a.ranks} ranks  {bn:7.1f} s  (runs: {', '.join(f'{x:.1f}' for x in many)})")
    print(f"{a.ranks} ranks / 1 rank = {bn / b1:.2f}  (target <= 0.70 for 2 ranks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
