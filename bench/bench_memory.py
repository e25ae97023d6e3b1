"""Memory of PSS's vector selection at the 70B shape (the 70B issue's target: under 4 GB).

For ``K`` concepts of random concept mass at ``L x d_ff`` (default the paper's 525 concepts,
Llama-2-70B's 80 x 28672 = 2.3M value vectors), every concept's differential score and its
top vectors for all six ratios, as ``compute_pss`` does it (streaming over concepts), each
in its own process, with peak RSS above the input measured by the kernel (VmHWM). The
baseline is the earlier dense selection (the ``K x L*d_ff`` float64 score matrix and a
stable argsort per concept and ratio), run in the same way on fewer concepts (it needs
``4 x K x L*d_ff`` doubles: 38 GB for 525 concepts at this shape); both are also run on the
same small ``K`` for a like-for-like ratio. Also printed: the accumulator and checkpoint
sizes an ``analyze`` run at this shape needs (what it prints before it starts).

    python bench/bench_memory.py                   # 525 concepts, 80 x 28672 (a few minutes)
    python bench/bench_memory.py --quick           # 40 concepts scored, 8 x 28672
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

RATIOS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)

CHILD = r"""
import json, resource, sys, time
import torch
method, K, L, D, C, scored, seed = sys.argv[1], *map(int, sys.argv[2:8])
from specext.metrics.pss import DifferentialScores, top_vectors_all

def rss():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}

g = torch.Generator().manual_seed(seed)
mass = torch.empty((K, L, D), dtype=torch.float32)
for k in range(K):  # row by row: no temporaries beyond one row
    mass[k] = torch.rand((L, D), generator=g)
cat = [k % C for k in range(K)]
base = rss()["VmRSS"]
ratios = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
t0 = time.perf_counter()
n_sel = 0
if method == "streaming":
    ds = DifferentialScores(mass, cat, "other")
    for k in range(scored):
        tops = top_vectors_all(ds(k), ratios, L, D, "global")
        n_sel += sum(int(t.numel()) for t in tops.values())
else:  # the earlier dense path: four K x N float64 matrices, then one stable argsort per ratio
    m = mass.reshape(K, -1).double()
    ok = torch.isfinite(m).all(1)
    m0 = torch.where(ok[:, None], m, torch.zeros_like(m))
    w = (~torch.eye(K, dtype=torch.bool)).double()
    d = m - (w @ m0) / w.sum(1, keepdim=True)
    for k in range(scored):
        for r in ratios:
            n = max(1, round(r / 100 * L * D))
            n_sel += int(torch.argsort(-d[k], stable=True)[:n].sort().values.numel())
sec = time.perf_counter() - t0
peak = rss()["VmHWM"]
print(json.dumps({"input_bytes": K * L * D * 4, "base_rss": base, "peak_rss": peak, "seconds": sec,
                  "selected": n_sel}))
"""


def run(method, K, L, D, C, scored, seed=0):
    r = subprocess.run([sys.executable, "-c", CHILD, method, str(K), str(L), str(D), str(C), str(scored), str(seed)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def gib(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    p = h.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--concepts", type=int, default=525)
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--d-ff", type=int, default=28672)
    p.add_argument("--categories", type=int, default=6)
    p.add_argument("--scored", type=int, default=None, help="concepts whose selection is computed (default all)")
    p.add_argument("--small", type=int, default=24, help="concepts for the like-for-like run with the dense baseline")
    args = p.parse_args()
    if args.quick:
        args.layers, args.concepts, args.scored, args.small = 8, 525, 40, 16
    device = torch.device("cpu")
    h.start("PSS selection memory at the 70B shape", device)
    K, L, D, C = args.concepts, args.layers, args.d_ff, args.categories
    scored = args.scored or K
    accum = K * L * D * 4 + K * L * 4
    print(f"an analyze run at this shape holds: accumulators {gib(accum)} (concept sums, float32, on "
          f"--accumulate-device), checkpoints {gib(accum)} each on disk (two while one replaces the other), "
          f"PSS selection working set {gib((C + 2) * L * D * 8)} (per-category sums in float64)\n")
    rows = []
    for method, k, sc in (("streaming", K, scored), ("streaming", args.small, args.small), ("dense", args.small, args.small)):
        need = 4 * k * L * D * 8 if method == "dense" else k * L * D * 4 + (C + 4) * L * D * 8
        if need > 0.8 * h.available_memory_bytes(device):
            rows.append({"bench": "pss_selection_memory", "extra": f"{method} K={k}", "shape": f"{L}x{D}",
                         "note": f"skipped: needs ~{gib(need)}"})
            continue
        res = run(method, k, L, D, C, sc)
        if "error" in res:
            rows.append({"bench": "pss_selection_memory", "extra": f"{method} K={k}", "shape": f"{L}x{D}",
                         "note": res["error"][:60]})
            continue
        work = res["peak_rss"] - res["base_rss"]
        rows.append({"bench": "pss_selection_memory", "extra": f"{method} K={k}, {sc} scored", "shape": f"{L}x{D}",
                     "input_gib": res["input_bytes"] / 2**30, "working_gib": work / 2**30,
                     "peak_gib": res["peak_rss"] / 2**30, "ours_ms": 1000 * res["seconds"] / max(sc, 1),
                     "note": "ms per concept"})
    small = {r["extra"].split(" K=")[0]: r for r in rows if f"K={args.small}," in r.get("extra", "")}
    if "streaming" in small and "dense" in small:
        s, d = small["streaming"], small["dense"]
        for r in (s, d):
            r["baseline_ms"] = d["ours_ms"]
            r["ratio"] = d["ours_ms"] / s["ours_ms"] if r is s else 1.0
        s["note"] = f"working memory {d['working_gib'] / max(s['working_gib'], 1e-9):.1f}x less than dense"
    h.print_table(rows, ["extra", "shape", "input_gib", "working_gib", "peak_gib", "ours_ms", "baseline_ms", "ratio", "note"])
    print("\ninput = the concept mass the run already holds; working = peak RSS above it during the selection;"
          "\nours_ms / baseline_ms = milliseconds per concept (all six ratios), dense = the earlier method.")
    if not args.no_csv:
        h.append_csv(args.csv, rows, device=device)
        print(f"\nappended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
