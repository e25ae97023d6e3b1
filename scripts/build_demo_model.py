#!/usr/bin/env python
"""Build the built-in ``synthetic`` probe and the demo model, deterministically.

Writes ``<data-dir>/synthetic.jsonl`` (the probe of the fictional world of
``specext.probes.synthetic``) and ``<data-dir>/demo_model/`` (a tiny LlamaForCausalLM trained on
CPU on that world: config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, specext_demo.json). ``<data-dir>`` defaults to the package's
``python/specext/data``.

The model is trained into ``demo_model.tmp`` and swapped in only once it has been reloaded
from disk and checked (size <= --max-mb, MCQ accuracy >= --min-acc); the script exits
non-zero when a check fails. Running it twice on the same machine (same torch, same
--threads) gives a byte-identical model.safetensors; the sha256 is printed to compare.

    python scripts/build_demo_model.py                     # rebuild the shipped files
    python scripts/build_demo_model.py --data-dir /tmp/x   # build elsewhere (e.g. to diff)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))  # use this checkout even if specext is not installed

from specext import probes  # noqa: E402
from specext.probes import synthetic  # noqa: E402
from specext.pipelines import training  # noqa: E402
from specext.probes import Question  # noqa: E402

logger = logging.getLogger("specext.build_demo_model")

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "specext_demo.json")
METADATA = "specext_demo.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mcq_report(lm, questions: Sequence[Question], batch_size: int = 64) -> dict:
    """Multiple-choice scores of ``lm`` (a :class:`specext.models.LoadedModel`) on
    ``questions``, by :class:`specext.probes.scoring.Scorer`: ``acc``, ``acc_norm`` (lm-eval
    conventions) and ``p_correct`` (the correct option's probability under a softmax over
    the options' summed log-likelihoods), each overall and by tier (high, medium, low)."""
    import torch

    from specext.metrics.accuracy import accuracy_by_group
    from specext.probes.scoring import Scorer

    scorer = Scorer(lm, open_ended=False)
    rows = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i:i + batch_size]
        for q, r in zip(batch, scorer.score(batch)):
            p = torch.softmax(torch.tensor(r.option_logprobs, dtype=torch.float64), 0)[q.answer]
            rows.append({"tier": q.tier, "acc": r.mcq_correct, "acc_norm": r.mcq_norm_correct, "p_correct": float(p)})
    keys = ("acc", "acc_norm", "p_correct")
    acc = accuracy_by_group(rows, keys)
    tiers = [t for t in synthetic.TIERS if t in acc["by_tier"]] + [t for t in acc["by_tier"] if t not in synthetic.TIERS]
    return {"n_questions": len(questions), **{k: acc[k] for k in keys},
            **{f"{k}_by_tier": {t: acc["by_tier"][t][k] for t in tiers} for k in keys}}


def train_demo_model(world: synthetic.World, out_dir: Union[str, Path], *, seed: int = 0, steps: int = 800,
                     d_model: int = 128, n_layers: int = 4, d_ff: int = 512, n_heads: int = 4,
                     batch_size: int = 32, lr: float = 3e-3, warmup: int = 60, min_lr_ratio: float = 0.05,
                     weight_decay: float = 0.01, threads: int = 1, dtype: str = "float32",
                     questions: Optional[Sequence[Question]] = None,
                     tier_repeats: Optional[Dict[str, int]] = None, qa_repeats: int = 1,
                     evaluate: bool = True, progress: bool = True) -> dict:
    """Train a tiny ``LlamaForCausalLM`` on :func:`specext.probes.synthetic.training_text` and save it.

    Deterministic on CPU (:func:`specext.pipelines.training.deterministic` with ``seed`` and ``threads``
    around the model's initialisation and the training). :func:`specext.pipelines.training.train`
    runs AdamW (betas 0.9/0.98, linear warm-up, cosine decay to ``min_lr_ratio * lr``,
    gradient clipping at 1) on right-padded batches of whole lines (``<s> line </s>``, every
    token a target). The model is saved as safetensors in ``dtype`` with the tokenizer and
    ``specext_demo.json`` (seed, hyper-parameters, losses, scores) by
    :func:`specext.pipelines.training.save`.

    Returns a dict with ``seed``, ``steps``, ``initial_loss``, ``final_loss`` (mean of the
    last 5% of steps), ``n_params``, ``n_train_lines``, ``n_train_tokens``, ``vocab_size``,
    ``train_seconds`` and, if ``evaluate``, :func:`mcq_report` on ``questions`` (default:
    :func:`specext.probes.synthetic.world_questions`).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specext.models import wrap_model

    if questions is None:
        questions = synthetic.world_questions(world)
    lines = synthetic.training_text(world, questions, seed=seed, tier_repeats=tier_repeats, qa_repeats=qa_repeats)
    tokenizer = synthetic.build_tokenizer(lines, extra_words=[c for q in questions for c in q.choices])
    cfg = training.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, schedule="cosine",
                               min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, betas=(0.9, 0.98),
                               max_grad_norm=1.0, seed=seed, threads=threads)
    with training.deterministic(seed, threads):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_ff,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
            max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.02,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
        data = training.encode_texts(tokenizer, lines)
        trained = training.train(model, data, cfg, pad_id=tokenizer.pad_token_id, progress=progress)
        result = {
            "seed": seed, "steps": steps, "initial_loss": trained.initial_loss, "final_loss": trained.final_loss,
            "n_params": sum(p.numel() for p in model.parameters()), "n_train_lines": len(lines),
            "n_train_tokens": sum(len(e.input_ids) for e in data), "vocab_size": len(tokenizer),
        }
        model.eval()
        if evaluate:
            result.update(mcq_report(wrap_model(model, tokenizer), questions))
    meta = {
        "description": "specext demo model: a tiny LlamaForCausalLM trained on the synthetic world "
                       "(specext.probes.synthetic); probe: specext/data/synthetic.jsonl",
        "world_seed": world.seed, "concepts": world.n_concepts, "categories": world.categories,
        "hyperparameters": {"d_model": d_model, "n_layers": n_layers, "d_ff": d_ff, "n_heads": n_heads,
                            "batch_size": batch_size, "lr": lr, "warmup": warmup, "min_lr_ratio": min_lr_ratio,
                            "weight_decay": weight_decay, "threads": threads, "dtype": dtype,
                            "tier_repeats": dict(synthetic.TIER_REPEATS if tier_repeats is None else tier_repeats),
                            "qa_repeats": qa_repeats},
        "torch_version": torch.__version__,
        **result,
    }
    training.save(model, tokenizer, out_dir, meta, metadata_name=METADATA, dtype=dtype)
    result["train_seconds"] = trained.seconds
    logger.info("trained %d steps in %.1fs: final loss %.4f%s", steps, trained.seconds, result["final_loss"],
                f", acc {result['acc']:.3f}" if evaluate else "")
    return result


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
    ap.add_argument("--min-acc", type=float, default=0.8, help="fail when the MCQ accuracy is lower")
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
    probes.write_jsonl(questions, probe_path)
    probe = probes.ProbeSet("synthetic", probes.read_jsonl(probe_path))
    probes.check_probe(probe, min_concepts=len(world.all_entities()))
    print(f"probe: {probe_path} ({len(probe)} questions, {len(probe.concepts)} concepts, "
          f"{len(probe.categories)} categories: {', '.join(probe.categories)})", flush=True)

    final = data_dir / "demo_model"
    tmp = data_dir / "demo_model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    result = train_demo_model(
        world, tmp, seed=args.seed, steps=args.steps, d_model=args.d_model, n_layers=args.n_layers,
        d_ff=args.d_ff, n_heads=args.n_heads, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
        dtype=args.dtype, questions=questions)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)

    # Check what was written: reload from disk and score the probe as read back from JSONL.
    import torch

    from specext.models import load_model

    torch.set_num_threads(args.threads)
    report = mcq_report(load_model(tmp, dtype="float32", device="cpu"), probe.questions)
    size = sum(f.stat().st_size for f in tmp.iterdir())
    failures = []
    if size > args.max_mb * 1e6:
        failures.append(f"demo model is {size / 1e6:.2f} MB > {args.max_mb} MB")
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
    print(f"reloaded: acc {report['acc']:.4f} ({fmt(report['acc_by_tier'])}), "
          f"acc_norm {report['acc_norm']:.4f}, p(correct) {report['p_correct']:.4f} ({fmt(report['p_correct_by_tier'])})")
    print(f"sha256 model.safetensors {sha256(final / 'model.safetensors')}")
    print(f"sha256 synthetic.jsonl   {sha256(probe_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
