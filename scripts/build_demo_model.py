#!/usr/bin/env python
"""Build the built-in ``synthetic`` probe and the demo model, deterministically.

Writes ``<data-dir>/synthetic.jsonl`` (the probe of the fictional world of
``specext.probes.synthetic``) and ``<data-dir>/demo_model/`` (a tiny LlamaForCausalLM trained on
CPU on that world: config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, specext_demo.json). ``<data-dir>`` defaults to the package's
``python/specext/data``.

``--holdout-per-category N --out-name holdout_model`` builds the held-out model instead: the
same world and recipe, without the facts and questions of N seeded concepts per category
(``specext.probes.synthetic.holdout_concepts``), which ``specext_demo.json`` lists as
``held_out_concepts``; the probe is then not rewritten, only checked to be the shipped one,
and the accuracy is checked on the seen concepts (the held-out accuracy is reported).

The model is trained into ``<out-name>.tmp`` and swapped in only once it has been reloaded
from disk and checked (size <= --max-mb, MCQ accuracy >= --min-acc); the script exits
non-zero when a check fails. Running it twice on the same machine (same torch, same
--threads) gives a byte-identical model.safetensors; the sha256 is printed to compare.

    python scripts/build_demo_model.py                     # rebuild the shipped files
    python scripts/build_demo_model.py --data-dir /tmp/x   # build elsewhere (e.g. to diff)
    python scripts/build_demo_model.py --holdout-per-category 2 --out-name holdout_model --max-mb 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))  # use this checkout even if specext is not installed

from specext import probes  # noqa: E402
from specext.probes import synthetic  # noqa: E402
from specext.pipelines import demo_models, training  # noqa: E402
from specext.pipelines.rundir import sha256_file  # noqa: E402

logger = logging.getLogger("specext.build_demo_model")

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "specext_demo.json")
METADATA = "specext_demo.json"


# The trainer and the scorer live in the package (the held-out model is built on first use
# when it is not shipped); the names stay importable from this script.
mcq_report = demo_models.mcq_report
train_demo_model = demo_models.train_synthetic_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT / "python" / "specext" / "data")
    ap.add_argument("--seed", type=int, default=0, help="world, option order and training seed")
    ap.add_argument("--concepts-per-category", type=int, default=12)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (part of the determinism; 1 is fastest for this tiny model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-mb", type=float, default=10.0, help="fail when demo_model is larger (MB = 1e6 bytes)")
    ap.add_argument("--min-acc", type=float, default=0.8,
                    help="fail when the MCQ accuracy (on the seen concepts, with --holdout-per-category) is lower")
    ap.add_argument("--holdout-per-category", type=int, default=0,
                    help="hold out this many seeded concepts per category: their facts and questions are left out "
                         "of the training text (the held-out model for fine-tuning; default 0: the demo model)")
    ap.add_argument("--out-name", default=None,
                    help="model directory under --data-dir (default demo_model, or holdout_model with "
                         "--holdout-per-category)")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)  # the library's progress lines, as plain lines
    handler.setFormatter(logging.Formatter("%(message)s"))
    lib = logging.getLogger("specext")
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)

    data_dir: Path = args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    world = synthetic.generate_world(args.seed, concepts_per_category=args.concepts_per_category)
    questions = synthetic.world_questions(world)
    probe_path = data_dir / "synthetic.jsonl"
    held = synthetic.holdout_concepts(world, args.holdout_per_category, args.seed) if args.holdout_per_category else []
    out_name = args.out_name or ("holdout_model" if held else "demo_model")
    if held and probe_path.is_file():
        # The held-out model shares the demo model's probe: check it, never rewrite it.
        check = data_dir / "synthetic.jsonl.check"
        probes.write_jsonl(questions, check)
        same = check.read_bytes() == probe_path.read_bytes()
        check.unlink()
        if not same:
            print(f"FAILED: {probe_path} is not the probe of world seed {args.seed} with "
                  f"{args.concepts_per_category} concepts per category; rebuild the demo model first", file=sys.stderr)
            return 1
    else:
        probes.write_jsonl(questions, probe_path)
    probe = probes.ProbeSet("synthetic", probes.read_jsonl(probe_path))
    probes.check_probe(probe, min_concepts=len(world.all_entities()))
    print(f"probe: {probe_path} ({len(probe)} questions, {len(probe.concepts)} concepts, "
          f"{len(probe.categories)} categories: {', '.join(probe.categories)})", flush=True)

    if held:
        print(f"held out ({len(held)}): {', '.join(held)}", flush=True)
    final = data_dir / out_name
    tmp = data_dir / f"{out_name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    result = train_demo_model(
        world, tmp, seed=args.seed, steps=args.steps, d_model=args.d_model, n_layers=args.n_layers,
        d_ff=args.d_ff, n_heads=args.n_heads, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
        dtype=args.dtype, questions=questions, held_out=held)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)

    # Check what was written: reload from disk and score the probe as read back from JSONL.
    import torch

    from specext.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(tmp, dtype="float32", device="cpu")
    report = mcq_report(lm, [q for q in probe.questions if q.concept not in set(held)])
    held_report = mcq_report(lm, [q for q in probe.questions if q.concept in set(held)]) if held else None
    size = sum(f.stat().st_size for f in tmp.iterdir())
    failures = []
    if size > args.max_mb * 1e6:
        failures.append(f"{out_name} is {size / 1e6:.2f} MB > {args.max_mb} MB")
    if report["acc"] < args.min_acc:
        failures.append(f"MCQ accuracy {report['acc']:.3f} < {args.min_acc}")
    missing = [f for f in MODEL_FILES if f != "generation_config.json" and not (tmp / f).is_file()]
    if missing:
        failures.append(f"missing {', '.join(missing)}")
    if failures:
        print("FAILED: " + "; ".join(failures) + f" (left in {tmp})", file=sys.stderr)
        return 1

    training.replace_dir(tmp, final)

    def fmt(d):
        return ", ".join(f"{k} {v:.3f}" for k, v in d.items())

    print(json.dumps({k: result[k] for k in ("seed", "steps", "n_params", "vocab_size", "n_train_lines",
                                             "n_train_tokens", "initial_loss", "final_loss")}))
    print(f"model: {final} ({size / 1e6:.2f} MB, {result['n_params']:,} parameters), "
          f"trained in {result['train_seconds']:.1f}s, total {time.perf_counter() - t_start:.1f}s")
    print(f"reloaded{' (seen concepts)' if held else ''}: acc {report['acc']:.4f} ({fmt(report['acc_by_tier'])}), "
          f"acc_norm {report['acc_norm']:.4f}, p(correct) {report['p_correct']:.4f} ({fmt(report['p_correct_by_tier'])})")
    if held_report is not None:
        print(f"reloaded (held-out concepts, {held_report['n_questions']} questions, chance 0.25): "
              f"acc {held_report['acc']:.4f}, acc_norm {held_report['acc_norm']:.4f}, "
              f"p(correct) {held_report['p_correct']:.4f}")
    print(f"sha256 model.safetensors {sha256_file(final / 'model.safetensors')}")
    print(f"sha256 synthetic.jsonl   {sha256_file(probe_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
