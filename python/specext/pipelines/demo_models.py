"""The two built-in models of the synthetic world, and how they are trained.

- :data:`DEMO_MODEL` (``specext/data/demo_model``): trained on every fact and question of
  the world (:mod:`specext.probes.synthetic`); it knows the probe (accuracy 1.0).
- :data:`HOLDOUT_MODEL` (``specext/data/holdout_model``): the same recipe, but the facts and
  questions of a seeded set of *held-out* concepts (2 per category,
  :func:`specext.probes.synthetic.holdout_concepts`) never enter its training text; their
  words are in its tokenizer. Fine-tuning experiments (issue 11) teach it those concepts,
  so that there is something to learn. Its ``specext_demo.json`` lists them under
  ``held_out_concepts`` (:func:`held_out_concepts`).

Both are built by ``scripts/build_demo_model.py`` (``--holdout-per-category 2 --out-name
holdout_model`` for the second), which calls :func:`train_synthetic_model`. When the
package ships without the held-out model, :func:`holdout_model_dir` builds it once into a
cache directory (``$SPECEXT_CACHE``, else ``$XDG_CACHE_HOME/specext``, else
``~/.cache/specext``) and reuses it afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from specext.pipelines import training
from specext.probes import synthetic
from specext.probes.probeset import DATA_DIR, Question

logger = logging.getLogger(__name__)

DEMO_MODEL = Path(DATA_DIR) / "demo_model"
HOLDOUT_MODEL = Path(DATA_DIR) / "holdout_model"
METADATA = "specext_demo.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", METADATA)
HOLDOUT_PER_CATEGORY = 2  # the shipped held-out model's setting
HOLDOUT_MIN_SEEN_ACC = 0.8  # a built held-out model must know its seen concepts


def mcq_report(lm, questions: Sequence[Question], batch_size: int = 64) -> dict:
    """Multiple-choice scores of ``lm`` (a :class:`specext.models.LoadedModel`) on
    ``questions``, by :class:`specext.probes.scoring.Scorer`: ``acc``, ``acc_norm`` (lm-eval
    conventions) and ``p_correct`` (the correct option's probability under a softmax over
    the options' summed log-likelihoods), each overall and by tier (high, medium, low)."""
    import torch

    from specext.metrics.accuracy import accuracy_by_group
    from specext.probes.scoring import Scorer

    if not questions:
        raise ValueError("mcq_report: no questions")
    scorer = Scorer(lm, open_ended=False)
    rows = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i:i + batch_size]
        for q, r in zip(batch, scorer.score(batch)):
            p = torch.softmax(torch.tensor(r.option_logprobs, dtype=torch.float64), 0)[q.answer]
            rows.append({"tier": q.tier, "acc": r.mcq_correct, "acc_norm": r.mcq_norm_correct,
                         "p_correct": p.item()})  # host: a CPU tensor built from host floats
    keys = ("acc", "acc_norm", "p_correct")
    acc = accuracy_by_group(rows, keys)
    tiers = [t for t in synthetic.TIERS if t in acc["by_tier"]] + [t for t in acc["by_tier"] if t not in synthetic.TIERS]
    return {"n_questions": len(questions), **{k: acc[k] for k in keys},
            **{f"{k}_by_tier": {t: acc["by_tier"][t][k] for t in tiers} for k in keys}}


def train_synthetic_model(world: synthetic.World, out_dir: Union[str, Path], *, seed: int = 0, steps: int = 800,
                          d_model: int = 128, n_layers: int = 4, d_ff: int = 512, n_heads: int = 4,
                          batch_size: int = 32, lr: float = 3e-3, warmup: int = 60, min_lr_ratio: float = 0.05,
                          weight_decay: float = 0.01, threads: int = 1, dtype: str = "float32",
                          questions: Optional[Sequence[Question]] = None,
                          tier_repeats: Optional[Dict[str, int]] = None, qa_repeats: int = 1,
                          held_out: Sequence[str] = (), evaluate: bool = True, progress: bool = True,
                          checkpoint_steps: Sequence[int] = (), checkpoint_dir: Optional[Union[str, Path]] = None
                          ) -> dict:
    """Train a tiny ``LlamaForCausalLM`` on :func:`specext.probes.synthetic.training_text` and save it.

    Deterministic on CPU (:func:`specext.pipelines.training.deterministic` with ``seed`` and ``threads``
    around the model's initialisation and the training). :func:`specext.pipelines.training.train`
    runs AdamW (betas 0.9/0.98, linear warm-up, cosine decay to ``min_lr_ratio * lr``,
    gradient clipping at 1) on right-padded batches of whole lines (``<s> line </s>``, every
    token a target). The model is saved as safetensors in ``dtype`` with the tokenizer and
    ``specext_demo.json`` (seed, hyper-parameters, losses, scores) by
    :func:`specext.pipelines.training.save`.

    ``held_out``: concepts whose facts and questions are left out of the training text
    (:func:`specext.probes.synthetic.training_text`); their fact sentences and questions
    are still given to the tokenizer, so that their words have tokens. With held-out
    concepts the metadata lists them (``held_out_concepts``) and the scores are reported
    for the seen and the held-out questions separately (``seen``, ``held_out``).

    ``checkpoint_steps``: optimizer steps (1-based) after which the model is also saved, to
    ``checkpoint_dir/step-NNNNN`` (the pretraining-dynamics study); the trajectory is the
    uninterrupted run's (the learning-rate schedule is the one of ``steps``).

    Returns a dict with ``seed``, ``steps``, ``initial_loss``, ``final_loss`` (mean of the
    last 5% of steps), ``n_params``, ``n_train_lines``, ``n_train_tokens``, ``vocab_size``,
    ``train_seconds`` and, if ``evaluate``, :func:`mcq_report` on the seen ``questions``
    (default: :func:`specext.probes.synthetic.world_questions`).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specext.models import wrap_model

    if questions is None:
        questions = synthetic.world_questions(world)
    held = list(dict.fromkeys(held_out))
    skip = set(held)
    lines = synthetic.training_text(world, questions, seed=seed, tier_repeats=tier_repeats, qa_repeats=qa_repeats,
                                    held_out=held)
    extra = [c for q in questions for c in q.choices]
    if held:  # the held-out concepts' words get tokens (untrained) so that fine-tuning can teach them
        extra += [t for e in world.all_entities() if e.name in skip for t in world.facts(e)]
        extra += [q.question for q in questions if q.concept in skip]
    tokenizer = synthetic.build_tokenizer(lines, extra_words=extra)
    cfg = training.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, schedule="cosine",
                               min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, betas=(0.9, 0.98),
                               max_grad_norm=1.0, seed=seed, threads=threads)
    ckpts = sorted({int(s) for s in checkpoint_steps})
    if ckpts and (checkpoint_dir is None or ckpts[0] < 1 or ckpts[-1] > steps):
        raise ValueError(f"checkpoint_steps must lie in [1, {steps}] and need checkpoint_dir, got {ckpts}")
    seen_q = [q for q in questions if q.concept not in skip]
    held_q = [q for q in questions if q.concept in skip]
    with training.deterministic(seed, threads):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_ff,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
            max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.02,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
        data = training.encode_texts(tokenizer, lines)
        on_step = None
        if ckpts:
            def on_step(step: int, m) -> None:
                if step in ckpts:
                    _save_checkpoint(m, tokenizer, Path(checkpoint_dir) / f"step-{step:05d}", step, dtype)
        trained = training.train(model, data, cfg, pad_id=tokenizer.pad_token_id, progress=progress,
                                 on_step=on_step)
        result = {
            "seed": seed, "steps": steps, "initial_loss": trained.initial_loss, "final_loss": trained.final_loss,
            "n_params": sum(p.numel() for p in model.parameters()), "n_train_lines": len(lines),
            "n_train_tokens": sum(len(e.input_ids) for e in data), "vocab_size": len(tokenizer),
        }
        model.eval()
        if evaluate:
            lm = wrap_model(model, tokenizer)
            result.update(mcq_report(lm, seen_q))
            if held:
                result["held_out"] = mcq_report(lm, held_q)
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
    if held:
        meta["description"] = ("specext held-out model: a tiny LlamaForCausalLM trained on the synthetic world "
                               "(specext.probes.synthetic) without the facts and questions of held_out_concepts "
                               "(their words are in the tokenizer); probe: specext/data/synthetic.jsonl; "
                               "acc/acc_norm/p_correct are on the seen concepts' questions, held_out on the others")
        meta["held_out_concepts"] = held
    training.save(model, tokenizer, out_dir, meta, metadata_name=METADATA, dtype=dtype)
    result["train_seconds"] = trained.seconds
    logger.info("trained %d steps in %.1fs: final loss %.4f%s", steps, trained.seconds, result["final_loss"],
                f", acc {result['acc']:.3f}" if evaluate else "")
    return result


def _save_checkpoint(model, tokenizer, out: Path, step: int, dtype: str) -> None:
    """Save a copy of the model mid-training (the training model keeps its dtype and mode)."""
    import copy

    snap = copy.deepcopy(model).eval()
    training.save(snap, tokenizer, out, {"step": step}, metadata_name="checkpoint.json", dtype=dtype)


# ---------------------------------------------------------------------------------------
# the held-out model: accessors and first-use build


def _complete(model_dir: Path) -> bool:
    return model_dir.is_dir() and all((model_dir / f).is_file() for f in MODEL_FILES)


def held_out_concepts(model_dir: Union[str, Path]) -> List[str]:
    """The held-out concepts of a model built with held-out concepts (``specext_demo.json:
    held_out_concepts``). ``ValueError`` when the directory has no such metadata (e.g. the
    demo model, which holds nothing out)."""
    meta_path = Path(model_dir) / METADATA
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no {METADATA}; not a specext synthetic-world model")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    held = meta.get("held_out_concepts")
    if not isinstance(held, list) or not all(isinstance(c, str) for c in held):
        raise ValueError(f"{meta_path}: no held_out_concepts list; this model was trained on every concept "
                         "(build one with scripts/build_demo_model.py --holdout-per-category N)")
    return list(held)


def cache_dir() -> Path:
    """Where models built on first use go: ``$SPECEXT_CACHE``, else ``$XDG_CACHE_HOME/specext``,
    else ``~/.cache/specext``."""
    if os.environ.get("SPECEXT_CACHE"):
        return Path(os.environ["SPECEXT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specext"


def build_holdout_model(out_dir: Union[str, Path], *, per_category: int = HOLDOUT_PER_CATEGORY, seed: int = 0,
                        concepts_per_category: int = 12, steps: int = 800, threads: int = 1,
                        min_seen_acc: float = HOLDOUT_MIN_SEEN_ACC, progress: bool = False, **train_kwargs) -> dict:
    """Build the held-out model into ``out_dir``: the world of ``seed``, ``per_category``
    held-out concepts per category, trained by :func:`train_synthetic_model` into a sibling
    temporary directory, reloaded from disk and scored (seen and held-out MCQ accuracy), and
    moved into place only when the seen accuracy is at least ``min_seen_acc`` (else
    ``RuntimeError``, the temporary directory left for inspection). Returns the training
    result with ``reloaded`` (seen) and ``reloaded_held_out`` reports."""
    from specext.models import load_model

    out_dir = Path(out_dir)
    world = synthetic.generate_world(seed, concepts_per_category=concepts_per_category)
    questions = synthetic.world_questions(world)
    held = synthetic.holdout_concepts(world, per_category, seed)
    tmp = out_dir.with_name(f"{out_dir.name}.build-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    result = train_synthetic_model(world, tmp, seed=seed, steps=steps, threads=threads, questions=questions,
                                   held_out=held, progress=progress, **train_kwargs)
    lm = load_model(tmp, dtype="float32", device="cpu")
    skip = set(held)
    result["reloaded"] = mcq_report(lm, [q for q in questions if q.concept not in skip])
    result["reloaded_held_out"] = mcq_report(lm, [q for q in questions if q.concept in skip])
    if result["reloaded"]["acc"] < min_seen_acc:
        raise RuntimeError(f"held-out model: accuracy on the seen concepts {result['reloaded']['acc']:.3f} < "
                           f"{min_seen_acc} (left in {tmp})")
    training.replace_dir(tmp, out_dir)
    logger.info("held-out model %s: seen acc %.3f, held-out acc %.3f (%d held-out concepts)", out_dir,
                result["reloaded"]["acc"], result["reloaded_held_out"]["acc"], len(held))
    return result


def holdout_model_dir() -> Path:
    """The held-out model: the shipped :data:`HOLDOUT_MODEL` when it is complete, else the
    one in :func:`cache_dir` (built there on first use with the shipped settings, a few
    minutes on one CPU core, and reused afterwards)."""
    if _complete(HOLDOUT_MODEL):
        return HOLDOUT_MODEL
    cached = cache_dir() / "holdout_model"
    if _complete(cached):
        return cached
    logger.warning("%s is missing: building the held-out model into %s (once; a few minutes on the CPU)",
                   HOLDOUT_MODEL, cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    build_holdout_model(cached)
    return cached
