"""Peak memory (RSS) of computing every value-vector norm of a sharded safetensors
checkpoint through ``specext.weights`` (one layer in memory at a time) against plain torch
(each shard loaded with ``safetensors.torch.load_file``, norms with
``torch.linalg.vector_norm(w.float(), dim=0)``).

A synthetic checkpoint is written first, in a temporary directory that is deleted at the
end (also on error or Ctrl-C): Llama naming and Llama-2/3-70B layer shapes (d_model 8192,
d_ff 28672, 8 KV heads), 5 layers plus embeddings and LM head, bf16 random normal(0, 0.02)
values, ~9.6 GB in shards of at most 3 GB with ``model.safetensors.index.json``. It is
written shard by shard and tensor by tensor from a 32 MiB pool of random values, so
writing never holds more than the pool. Each method runs in its own subprocess, which
reports its peak RSS (``getrusage``'s ``ru_maxrss``: anonymous and file-backed pages, so
the mapped pages of safetensors count), the peak reached while importing torch (a floor
for every method) and its RSS once the imports are done.

Methods:
- ours: ``specext.weights.iter_value_vector_norms`` (stored dtype, on --device);
- torch, load_file: ``load_file(shard)`` (safetensors >= 0.4 maps the file lazily: only
  the tensors read become resident), norms of the shard's down-projections;
- torch, load_file materialised: the same with every tensor of the shard copied to
  memory (``.clone()``), which is what loading a shard fully costs.

    python bench/bench_weights_memory.py
    python bench/bench_weights_memory.py --quick --no-csv
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCH = "weights_memory"
METHODS = {
    "ours": "ours: specext.weights.iter_value_vector_norms",
    "load_file": "torch: load_file per shard (lazy mmap)",
    "materialised": "torch: load_file per shard, materialised",
}
LIMIT_MIB = 2048  # the target: ours stays under 2 GB


# ----------------------------------------------------------------------- the child


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, ckpt: Path, out: Path, device: str) -> None:
    """Compute every layer's value-vector norms with ``method``; print one JSON line."""
    import resource

    import torch
    from safetensors.torch import load_file

    import specext.weights as W
    from specext.kernels import ops  # noqa: F401  (the extension loads in every method)

    floor = _rss_mib()
    import_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t0 = time.perf_counter()
    norms = {}
    if method == "ours":
        for layer, n in W.iter_value_vector_norms(ckpt, device=device):
            norms[layer] = n.cpu()
    else:
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
        by_shard = {}
        for name, shard in index.items():
            hit = W.match_down_proj(name)
            if hit is not None:
                by_shard.setdefault(shard, []).append((hit.layer, name))
        for shard in sorted(by_shard):
            sd = load_file(str(ckpt / shard))
            if method == "materialised":
                sd = {k: v.clone() for k, v in sd.items()}
            for layer, name in by_shard[shard]:
                w = sd[name].to(device)
                norms[layer] = torch.linalg.vector_norm(w.float(), dim=0).cpu()
                del w
            del sd
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(torch.stack([norms[i] for i in sorted(norms)]), out)
    print(json.dumps({"method": method, "peak_mib": peak, "floor_mib": floor, "import_peak_mib": import_peak,
                      "seconds": seconds}))


# ------------------------------------------------------------------ the checkpoint


def geometry(quick: bool) -> dict:
    if quick:
        return dict(d_model=512, d_ff=1408, kv=128, vocab=2048, layers=4, shard_bytes=6 << 20)
    return dict(d_model=8192, d_ff=28672, kv=1024, vocab=32000, layers=5, shard_bytes=3 * 10**9)


def tensor_list(g: dict):
    """(name, shape) in the order HF writes them: embeddings, layer by layer, head."""
    dm, dff, kv = g["d_model"], g["d_ff"], g["kv"]
    out = [("model.embed_tokens.weight", (g["vocab"], dm))]
    for i in range(g["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (dm,)),
            (p + "self_attn.q_proj.weight", (dm, dm)),
            (p + "self_attn.k_proj.weight", (kv, dm)),
            (p + "self_attn.v_proj.weight", (kv, dm)),
            (p + "self_attn.o_proj.weight", (dm, dm)),
            (p + "post_attention_layernorm.weight", (dm,)),
            (p + "mlp.gate_proj.weight", (dff, dm)),
            (p + "mlp.up_proj.weight", (dff, dm)),
            (p + "mlp.down_proj.weight", (dm, dff)),
        ]
    out += [("model.norm.weight", (dm,)), ("lm_head.weight", (g["vocab"], dm))]
    return out


def _nbytes(shape) -> int:
    n = 2  # bf16
    for s in shape:
        n *= s
    return n


def write_checkpoint(d: Path, g: dict) -> tuple:
    """Write the sharded checkpoint into ``d``; returns (total bytes, number of shards)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(16 << 20, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    shards, cur, size = [], [], 0
    for name, shape in tensor_list(g):
        nb = _nbytes(shape)
        if cur and size + nb > g["shard_bytes"]:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nb
    shards.append(cur)

    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + _nbytes(shape)]}
            off += _nbytes(shape)
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for j, (name, shape) in enumerate(tensors):
                left, pos = _nbytes(shape), (hash(name) & 0xFFFF) * 2 * 97 % len(pool)
                while left:
                    piece = pool[pos : pos + min(left, len(pool) - pos)]
                    f.write(piece)
                    left -= len(piece)
                    pos = 0
        total += off + 8 + len(hb)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": g["d_model"],
        "intermediate_size": g["d_ff"], "num_hidden_layers": g["layers"], "num_attention_heads": g["d_model"] // 128,
        "num_key_value_heads": g["kv"] // 128, "vocab_size": g["vocab"], "torch_dtype": "bfloat16"}))
    return total, len(shards)


# --------------------------------------------------------------------------- main


def run_child(method: str, ckpt: Path, tmp: Path, device: str) -> dict:
    out = tmp / f"norms-{method}.pt"
    r = subprocess.run([sys.executable, __file__, "--child", method, "--ckpt", str(ckpt), "--out", str(out),
                        "--device", device], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{method} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["out"] = out
    return res


def main(argv=None) -> None:
    import _harness as h  # sets the OpenMP wait policy before torch loads
    import torch

    p = h.make_parser(__doc__.splitlines()[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the temporary checkpoint")
    p.add_argument("--no-materialised", action="store_true", help="skip the materialised baseline")
    args = p.parse_args(argv)
    device = h.resolve_device(args.device)
    h.start(f"{BENCH} ({'quick' if args.quick else 'default'})", device)

    g = geometry(args.quick)
    need = sum(_nbytes(s) for _, s in tensor_list(g))
    free = shutil.disk_usage(args.dir).free
    if free < need + (1 << 30):
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB (+1 GB)")
    # SIGTERM unwinds like Ctrl-C, so the checkpoint is deleted either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="specext-bench-weights-", dir=args.dir))
    try:
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        t0 = time.perf_counter()
        total, n_shards = write_checkpoint(ckpt, g)
        print(f"checkpoint:   {total / 1e9:.2f} GB in {n_shards} shards ({g['layers']} layers, down_proj "
              f"{g['d_model']}x{g['d_ff']} bf16 = {_nbytes((g['d_model'], g['d_ff'])) / 2**20:.0f} MiB each), "
              f"written in {time.perf_counter() - t0:.1f} s to {tmp}")
        print()
        methods = ["ours", "load_file"] + ([] if args.no_materialised else ["materialised"])
        res = {m: run_child(m, ckpt, tmp, device.type) for m in methods}
        ref = torch.load(res["ours"]["out"])
        rows = []
        for m in methods:
            r = res[m]
            n = torch.load(r["out"])
            diff = ((n - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
            rows.append({
                "method": METHODS[m], "peak": r["peak_mib"], "import_peak": r["import_peak_mib"],
                "floor": r["floor_mib"], "above": r["peak_mib"] - r["floor_mib"],
                "vs_ours": r["peak_mib"] / res["ours"]["peak_mib"], "seconds": r["seconds"], "rel_diff": f"{diff:.1e}",
            })
        h.print_table(rows, [("method", "method"), ("peak", "peak RSS MiB"), ("import_peak", "peak in imports MiB"),
                             ("floor", "RSS after imports MiB"),
                             ("above", "peak - RSS after imports"), ("vs_ours", "peak / ours"), ("seconds", "wall s"),
                             ("rel_diff", "max rel diff vs ours")])
        ours = res["ours"]["peak_mib"]
        print(f"\nours: peak RSS {ours:.0f} MiB for a {total / 1e9:.1f} GB checkpoint: "
              f"{'under' if ours < LIMIT_MIB else 'OVER'} the {LIMIT_MIB} MiB target")
        if not args.no_csv:
            shape = f"{g['layers']}x{g['d_model']}x{g['d_ff']}"
            csv_rows = [{
                "bench": BENCH, "shape": shape, "dtype": "bfloat16",
                "extra": (f"method={m};peak_rss_mib={res[m]['peak_mib']:.0f};ours_peak_rss_mib={ours:.0f};"
                          f"checkpoint_gb={total / 1e9:.2f};shards={n_shards}"),
                "ours_ms": res["ours"]["seconds"] * 1e3, "baseline_ms": res[m]["seconds"] * 1e3,
                "ratio": res[m]["seconds"] / res["ours"]["seconds"],
            } for m in methods if m != "ours"]
            h.append_csv(args.csv, csv_rows, device=device)
            print(f"appended {len(csv_rows)} rows to {args.csv}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        import argparse

        a = argparse.ArgumentParser()
        a.add_argument("--child")
        a.add_argument("--ckpt", type=Path)
        a.add_argument("--out", type=Path)
        a.add_argument("--device", default="cpu")
        ns = a.parse_args()
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        child(ns.child, ns.ckpt, ns.out, ns.device)
    else:
        main()
