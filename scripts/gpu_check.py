#!/usr/bin/env python
"""The end-to-end part of ``scripts/gpu_check.sh`` (which builds, runs the tests under
compute-sanitizer and the kernel benchmarks around it):

1. ``demo``: ``python -m specext.analyze --demo`` with PSS on ``--device`` and on the CPU;
   the same accuracy and the statistics within float32 tolerance (printed, and a non-zero
   exit when they disagree);
2. ``model``: a random-weights Llama-style model of about 1B parameters (``--quick``: ~3M)
   built here with the demo tokenizer: tokens per second of the scoring pass with and
   without the per-neuron statistics, and of PSS's batched masked scoring against one mask
   at a time (bench/bench_pss.py's naive-1);
3. ``devicemap``: the same model analysed (scoring, specialisation, PSS on a sample) in
   memory and loaded with ``--device-map sequential`` under a ``--max-memory`` budget of
   half its weights, so that about half its layers are offloaded (to the CPU on a GPU
   machine, to disk with ``--device cpu``): it must run to the end and give the in-memory
   accuracy, statistics and PSS curve (bit for bit expected on the CPU; on CUDA, whose
   atomics add in no fixed order, the statistics within float32 tolerance and the PSS
   curve informational: a near tie in the statistics may change the top vectors).

Every table is printed and written to ``--out``/gpu_check_*.csv; the model, the offload folder
and the run directories go to ``--work`` (default: ``--out``).

    python scripts/gpu_check.py --device cuda --out /tmp/specext-gpu
    python scripts/gpu_check.py --device cpu --quick --out /tmp/x       # CI: keeps it from rotting
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402


def write_csv(path: Path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def show(rows):
    import _harness as bench_harness

    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    width = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(width[k]) for k in keys).rstrip())
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(width[k]) for k in keys).rstrip())
    bench_harness.save_table_cells(rows, keys)  # $SPECEXT_TABLES_CSV, when gpu_check.sh sets it


def demo(args, out: Path):
    from safetensors.torch import load_file

    # The device run and the CPU reference run at the same time (the CUDA run needs about one
    # core): the CPU run gets the other cores, the device run two. Each writes its
    # stdout/stderr to a log.
    devs = list(dict.fromkeys([args.device, "cpu"]))
    procs, runs = {}, {}
    t0 = time.perf_counter()
    for dev in devs:
        d = args.work / f"demo_{dev}"
        cmd = [sys.executable, "-m", "specext.analyze", "--demo", "--device", dev, "--out", str(d), "-q",
               "--overwrite", "--no-report", "--no-random-twin"] + (["--pss-concepts", "6", "--ratios", "1,10"] if args.quick else [])
        env = dict(os.environ)
        if len(devs) > 1:
            env["OMP_NUM_THREADS"] = str(max(1, _cpus() - 2)) if dev == "cpu" else "2"
        log = open(args.work / f"demo_{dev}.log", "w")
        procs[dev] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env), log, d)
    ends = {}
    while len(ends) < len(procs):
        for dev, (p, log, d) in procs.items():
            if dev not in ends and p.poll() is not None:
                ends[dev] = time.perf_counter() - t0
                log.close()
        time.sleep(0.2)
    for dev, (p, log, d) in procs.items():
        if p.returncode != 0:
            raise SystemExit(f"demo on {dev} failed (rc={p.returncode}):\n"
                             f"{(args.work / f'demo_{dev}.log').read_text()[-3000:]}")
        runs[dev] = (json.loads((d / "summary.json").read_text()), load_file(str(d / "neurons.safetensors")), ends[dev])
    s_dev, n_dev, t_dev = runs[args.device]
    s_cpu, n_cpu, t_cpu = runs["cpu"]
    rows, ok = [], True
    for k in ("mcq", "mcq_norm", "open"):
        same = s_dev["accuracy"][k] == s_cpu["accuracy"][k]
        ok &= same
        rows.append({"check": f"accuracy {k}", "device": s_dev["accuracy"][k], "cpu": s_cpu["accuracy"][k],
                     "max_abs_diff": abs((s_dev["accuracy"][k] or 0) - (s_cpu["accuracy"][k] or 0)), "ok": same})
    for k in ("gini", "entropy", "norm_entropy", "top_share", "total", "gini_null"):
        a, b = n_dev[k].double(), n_cpu[k].double()
        diff = float((a - b).abs().nan_to_num(0).max())
        close = bool(torch.allclose(a, b, rtol=2e-4, atol=2e-5, equal_nan=True))
        ok &= close if k != "gini_null" else True  # the null's thresholds depend on ties; informational
        rows.append({"check": f"neurons {k}", "device": float(a.nan_to_num(0).mean()), "cpu": float(b.nan_to_num(0).mean()),
                     "max_abs_diff": diff, "ok": close})
    pd, pc = s_dev["pss"]["paper"]["curve"], s_cpu["pss"]["paper"]["curve"]
    rows.append({"check": "PSS curve (paper)", "device": max(pd), "cpu": max(pc),
                 "max_abs_diff": max(abs(x - y) for x, y in zip(pd, pc)), "ok": "informational"})
    rows.append({"check": "seconds (side by side)", "device": t_dev, "cpu": t_cpu, "max_abs_diff": "", "ok": ""})
    print(f"\n== demo: analyze --demo on {args.device} vs cpu")
    show(rows)
    write_csv(out / "gpu_check_demo.csv", rows)
    return ok


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def build_model(args, path: Path):
    import transformers as tf

    tf.utils.logging.disable_progress_bar()  # save_pretrained's shard bar would litter the log

    from specext.analyze import DEMO_MODEL

    tok = tf.AutoTokenizer.from_pretrained(DEMO_MODEL)
    if args.quick:
        dims = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
    else:  # ~1.1B parameters with the demo's small vocabulary: the MLPs and attention dominate
        dims = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16)
    cfg = tf.LlamaConfig(vocab_size=len(tok), num_key_value_heads=dims["num_attention_heads"],
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"], **dims)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16 if args.device == "cuda" else torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def model_throughput(args, out: Path):
    import _harness as bench_harness
    import bench_pss
    from specext.metrics.pss import MaskedScorer, PSSConfig, compute_pss
    from specext.metrics.specialization import ConceptMass
    from specext.models import load_model
    from specext.probes import load_probe
    from specext.probes.scoring import PromptStats, Scorer

    path = args.work / "random_llama"
    n_params = build_model(args, path)
    lm = load_model(path, device=args.device)
    probe = load_probe("synthetic", max_concepts=12 if args.quick else 36)
    qs = probe.questions
    bs = 8 if args.quick else 64
    tokens = sum(len(lm.tokenizer(q.mcq_prompt())["input_ids"]) for q in qs)
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else (lambda: None)
    scorer = Scorer(lm, open_ended=False)
    stats = PromptStats(lm.n_layers, lm.d_ff)
    mass = ConceptMass(len(probe.concepts), lm.n_layers, lm.d_ff, device=lm.device)

    batches = [qs[i : i + bs] for i in range(0, len(qs), bs)]

    def plain(b):
        scorer.score(b)

    def captured(b):
        scorer.score(b, stats=stats)
        mass.add(torch.tensor([probe.concept_index(q) for q in b], device=lm.device), stats.sums, stats.valid)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for b in batches:  # warm-up (and the concept mass the PSS part below uses)
        plain(b)
        captured(b)
    # Each batch both ways next to each other (bench/_harness.py time_pairs), per batch the
    # median over rounds, summed (paired_excess), with a bootstrap interval.
    rounds = 1 if args.quick else 5
    own, base = [], []
    for r in range(rounds):
        o, p = bench_harness.time_pairs(len(batches), r, lambda i: captured(batches[i]), lambda i: plain(batches[i]),
                                        timed)
        own.append(o)
        base.append(p)
    tp, tc = bench_harness.paired_total(base), bench_harness.paired_total(own)

    def overhead(k=None):
        return bench_harness.paired_excess(own, base, k) / bench_harness.paired_total(base, k)

    lo, hi = bench_harness.bootstrap(overhead, rounds)
    rows = [{"bench": "scoring pass", "model": f"llama {n_params / 1e9:.2f}B L={lm.n_layers} d_ff={lm.d_ff}",
             "device": args.device, "dtype": str(lm.dtype).replace("torch.", ""), "questions": len(qs),
             "tokens_per_s_plain": tokens / tp, "tokens_per_s_with_statistics": tokens / tc,
             "overhead_pct": 100 * overhead(), "overhead_ci95_pct": f"{100 * lo:+.2f}..{100 * hi:+.2f}"}]
    cm = mass.concept_mass()
    cfg = PSSConfig(concepts=2 if args.quick else 4, control_size=20 if args.quick else 60, ratios=(1.0, 10.0),
                    bootstrap=0, batch_rows=64 if args.quick else 256)
    overall = 0.5
    res = {}
    for name, ms in (("batched rows", MaskedScorer(lm, batch_rows=cfg.batch_rows)),
                     ("one mask at a time", bench_pss.OneMaskAtATime(lm, batch_rows=bs))):
        t = timed(lambda: res.__setitem__(name, compute_pss(lm, probe, cm, cfg, overall_accuracy=overall, scorer=ms)))
        rows.append({"bench": f"PSS masked scoring, {name}", "model": rows[0]["model"], "device": args.device,
                     "seconds": t, "rows": len(res[name].rows)})
    a, b = res["batched rows"].rows, res["one mask at a time"].rows
    rows[-2]["speedup_vs_one_mask"] = rows[-1]["seconds"] / rows[-2]["seconds"]
    rows[-2]["max_pss_diff"] = max(abs(x["pss"] - y["pss"]) for x, y in zip(a, b))
    print(f"\n== random-weights model ({n_params / 1e6:.0f}M parameters) on {args.device}")
    show(rows)
    write_csv(out / "gpu_check_model.csv", rows)
    return True


def device_map_check(args, out: Path):
    from safetensors.torch import load_file

    path = args.work / "random_llama"
    if not (path / "config.json").exists():
        build_model(args, path)
    from safetensors import safe_open

    sizes = {}  # bytes per layer ("" for the rest: embeddings, norm, head)
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                layer = k.split("layers.")[1].split(".")[0] if "layers." in k else ""
                sizes[layer] = sizes.get(layer, 0) + n * (2 if sl.get_dtype() in ("BF16", "F16") else 4)
    per_layer = max(v for k, v in sizes.items() if k)
    n_layers = len(sizes) - 1
    # The rest, half the layers and the one layer accelerate keeps free on the device for
    # streaming offloaded layers in: the other layers go to the CPU (with a GPU) or to disk
    # (the CPU alone; CPU-mapped layers simply run in place there).
    fit = sizes[""] + (n_layers // 2 + 1) * per_layer + per_layer // 2
    budget = f"0={fit},cpu={64 * sum(sizes.values())}" if args.device == "cuda" else f"cpu={fit}"
    common = ["--probe", "synthetic", "--max-concepts", "6" if args.quick else "12", "--device", args.device,
              "--no-report", "--no-random-twin", "-q", "--ratios", "1,10", "--pss-concepts", "2",
              "--pss-control", "20", "--bootstrap", "0", "--max-new-tokens", "4", "--null-permutations", "2"]
    runs = {}
    # with a map, the map places the layers: --device must be auto (or cpu), not cuda
    mapped = ["--device", "auto" if args.device == "cuda" else args.device, "--device-map", "sequential",
              "--max-memory", budget, "--offload-dir", str(args.work / "offload")]
    for name, extra in (("in memory", []), ("device map", mapped)):
        d = args.work / f"devicemap_{name.replace(' ', '_')}"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "specext.analyze", str(path), "--out", str(d), "--overwrite", *common, *extra],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"analyze ({name}) failed:\n{r.stderr[-3000:]}")
        runs[name] = (json.loads((d / "summary.json").read_text()), load_file(str(d / "neurons.safetensors")),
                      json.loads((d / "config.json").read_text())["model"], time.perf_counter() - t0)
    (s_a, n_a, _, t_a), (s_b, n_b, m_b, t_b) = runs["in memory"], runs["device map"]
    places = [p["placement"] for p in m_b["layers_placement"] or []]
    offloaded = sum(p in (("cpu", "disk") if args.device == "cuda" else ("disk",)) for p in places)
    rows = [{"check": "layers offloaded", "in_memory": 0, "device_map": f"{offloaded} of {len(places)}",
             "max_abs_diff": "", "ok": 0 < offloaded < len(places)}]
    exact = args.device == "cpu"
    for k in ("mcq", "mcq_norm", "open"):
        a, b = s_a["accuracy"][k], s_b["accuracy"][k]
        rows.append({"check": f"accuracy {k}", "in_memory": a, "device_map": b,
                     "max_abs_diff": abs((a or 0) - (b or 0)), "ok": a == b})
    for k in ("gini", "entropy", "norm_entropy", "top_share", "total", "value_norms"):
        a, b = n_a[k].double(), n_b[k].double()
        same = bool(torch.equal(a.nan_to_num(-7), b.nan_to_num(-7))) if exact else bool(
            torch.allclose(a, b, rtol=2e-4, atol=2e-5, equal_nan=True))
        rows.append({"check": f"neurons {k}", "in_memory": float(a.nan_to_num(0).mean()),
                     "device_map": float(b.nan_to_num(0).mean()),
                     "max_abs_diff": float((a - b).abs().nan_to_num(0).max()), "ok": same})
    pa, pb = s_a["pss"]["paper"]["curve"], s_b["pss"]["paper"]["curve"]
    # on CUDA the statistics differ in the last bits (atomics), so the top vectors may differ
    # at a near tie and with them a masked answer: the curve is then informational
    rows.append({"check": "PSS curve (paper)", "in_memory": max(pa), "device_map": max(pb),
                 "max_abs_diff": max(abs(x - y) for x, y in zip(pa, pb)), "ok": pa == pb if exact else "informational"})
    rows.append({"check": "seconds", "in_memory": t_a, "device_map": t_b, "max_abs_diff": "", "ok": ""})
    print(f"\n== --device-map sequential --max-memory {budget} vs in memory on {args.device} "
          f"(placements: {', '.join(f'{p} x{places.count(p)}' for p in dict.fromkeys(places))})")
    show(rows)
    write_csv(out / "gpu_check_devicemap.csv", rows)
    return all(r["ok"] is True for r in rows if r["ok"] not in ("", "informational"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/specext-gpu"))
    p.add_argument("--work", default=None,
                   help="where the big files go: the ~1B model (2.2 GB), its offload folder, the run directories "
                        "(default: --out; gpu_check.sh keeps them out of $OUT, which only small files may leave)")
    p.add_argument("--only", choices=["demo", "model", "devicemap"], default=None)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = Path(args.work) if args.work else out
    args.work.mkdir(parents=True, exist_ok=True)
    ok = True
    if args.only in (None, "demo"):
        ok &= demo(args, out)
    if args.only in (None, "model"):
        ok &= model_throughput(args, out)
    if args.only in (None, "devicemap"):
        ok &= device_map_check(args, out)
    print("\ngpu_check.py:", "ok" if ok else "MISMATCH (see the tables above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
