"""Causal-LM training on CPU or GPU: data, schedule, seeding, the loop, and saving.

One loop serves every trainer in the package: the demo model of
``scripts/build_demo_model.py`` (all parameters, whole lines) and the causal fine-tuning
experiments (only chosen parameters, e.g. a dense delta per layer on selected
down-projection columns, trained on the answer tokens only).

- Data: :class:`Example` is one token sequence with a *loss mask* (which tokens are
  training targets). :func:`encode_texts` trains on every token of a text,
  :func:`encode_pairs` only on a target after its prompt. :func:`collate` right-pads a
  batch and turns the loss mask into ``labels`` (``-100`` = not a target).
- Schedule: :func:`lr_at`, linear warm-up then cosine (or linear, or constant) decay to
  ``min_lr_ratio * lr`` (approached, not reached: see :func:`lr_at`).
- Seeding: :func:`deterministic` seeds torch, turns on deterministic algorithms and sets
  the thread count, restoring the previous settings afterwards.
- The loop: :func:`train`, AdamW with weight decay on matrices only, gradient clipping,
  optional gradient accumulation, a tqdm bar showing the loss.
- Saving: :func:`save`, safetensors weights + tokenizer + a metadata JSON, written to a
  temporary directory and swapped in (:func:`replace_dir`).

Loss convention: the mean cross-entropy (nats) per target token over all micro-batches of
an optimizer step, so ``k`` micro-batches of ``b`` sequences train like one batch of
``k * b`` sequences.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of a position that is not a training target (transformers' convention)
SCHEDULES = ("cosine", "linear", "constant")

# ---------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids`` ``(S,)`` token ids and ``loss_mask`` ``(S,)``,
    True where the token is a training target (predicted from the tokens before it; the
    first token's entry has no effect, nothing predicts it)."""

    input_ids: Tuple[int, ...]
    loss_mask: Tuple[bool, ...]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask {len(self.loss_mask)}")
        if not self.input_ids:
            raise ValueError("an example needs at least one token")

    @property
    def n_targets(self) -> int:
        """Tokens trained on (the first token never is)."""
        return sum(self.loss_mask[1:])


def _eos(tokenizer, eos: bool) -> List[int]:
    if not eos:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError(f"eos=True but tokenizer {type(tokenizer).__name__} has no EOS token")
    return [tokenizer.eos_token_id]


def encode_texts(tokenizer, texts: Sequence[str], *, eos: bool = True) -> List[Example]:
    """Every token of each text is a target: ``tokenizer(text)`` (with its special tokens,
    e.g. BOS) followed by EOS when ``eos``."""
    tail = _eos(tokenizer, eos)
    out = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"]) + tail
        out.append(Example(tuple(ids), (True,) * len(ids)))
    return out


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str], *, eos: bool = True) -> List[Example]:
    """Only the target is trained on: ``tokenizer(prompt)`` (context, no loss) followed by the
    target's tokens (and EOS when ``eos``), split the lm-evaluation-harness way
    (:func:`specext.probes.scoring.continuation_ids`); a target that should follow a space starts
    with one (``" Paris"``)."""
    from specext.probes.scoring import continuation_ids

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    tail = _eos(tokenizer, eos)
    out = []
    for prompt, target in zip(prompts, targets):
        ctx = list(tokenizer(prompt)["input_ids"])
        cont = continuation_ids(tokenizer, prompt, target) + tail
        if not cont:
            raise ValueError(f"target {target!r} after {prompt!r} encodes to no tokens")
        out.append(Example(tuple(ctx + cont), (False,) * len(ctx) + (True,) * len(cont)))
    return out


@dataclass
class Batch:
    """Right-padded token batch, all ``(B, S)`` int64: ``input_ids`` (``pad_id`` after each
    sequence), ``attention_mask`` (1 on real tokens) and ``labels`` (the token where it is a
    target, :data:`IGNORE_INDEX` elsewhere, padding included)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_targets(self) -> int:
        """Positions that enter the loss (labels are shifted: position 0 never does)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` to the longest one (see :class:`Batch`)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        target[i, :n] = torch.tensor(e.loss_mask)
    return Batch(ids, mask, ids.masked_fill(~target, IGNORE_INDEX))


def example_order(n: int, seed: int) -> Iterator[int]:
    """Endless stream of example indices: one seeded permutation of ``range(n)`` after
    another (``random.Random(seed)``), so every example is seen once per epoch and the
    stream does not depend on the batch size."""
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        yield from perm


# ---------------------------------------------------------------------------------------
# configuration, schedule, seeding


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``steps``: optimizer steps. Each step uses ``accumulation`` micro-batches of
    ``batch_size`` sequences. ``lr``: peak learning rate, reached after ``warmup`` steps
    (linear from ``lr / warmup``), then decayed by ``schedule`` towards ``min_lr_ratio * lr``
    (:func:`lr_at`: the last step's rate is one decay step above it, e.g. ``lr / (steps -
    warmup)`` for ``linear`` with ``min_lr_ratio`` 0). AdamW (``betas``, ``eps``) with ``weight_decay`` on parameters of two or
    more dimensions only; gradients clipped to a global L2 norm of ``max_grad_norm`` (None:
    no clipping). ``seed`` seeds torch (:func:`deterministic`) and, as ``seed + 1``, the
    data order; ``threads``: torch intra-op threads during training (None: leave as is).
    ``log_every``: log a line every this many steps (and after the first).
    ``dropout``: run the model in train mode, its dropout active as its config says (True),
    or in eval mode with dropout off (False). With dropout off, ``accumulation`` micro-batches
    of ``batch_size`` train exactly like one batch of ``accumulation * batch_size``; with it on,
    only in expectation (each micro-batch draws its own masks).
    """

    steps: int
    batch_size: int = 32
    accumulation: int = 1
    lr: float = 1e-3
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    threads: Optional[int] = None
    log_every: int = 100
    dropout: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.accumulation < 1:
            raise ValueError(f"steps, batch_size and accumulation must be >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.accumulation}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"warmup must be >= 0 and min_lr_ratio in [0, 1], got {self.warmup}, {self.min_lr_ratio}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup`` during
    warm-up (its last step reaches ``lr``), then ``cfg.schedule`` from ``lr`` at the first step
    after it towards ``min_lr_ratio * lr``, at fraction ``t = (step - warmup) / (steps -
    warmup)`` of the way: the rate would reach the minimum one step after the last, so the last
    step's rate is one decay step above it (and ``lr`` is held for two steps when there is a
    warm-up). Changing this would change every trained model (the shipped demo's bytes
    included), so it is documented rather than changed."""
    lr, warmup, lo = cfg.lr, cfg.warmup, cfg.min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return lr
    t = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.schedule == "linear":
        return lr * (lo + (1 - lo) * (1 - t))
    return lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def deterministic(seed: int, threads: Optional[int] = None) -> Iterator[None]:
    """Seed torch (``torch.manual_seed``: CPU and every GPU), turn on deterministic
    algorithms and, if given, use ``threads`` intra-op threads; the thread count and the
    deterministic flag are restored on exit (the random state is not). Results are then
    reproducible on the same machine, torch version and thread count."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    # Deterministic cuBLAS needs a fixed workspace (torch.use_deterministic_algorithms' docs);
    # without it the first CUDA matmul raises.
    set_cublas = torch.cuda.is_available() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if set_cublas:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if threads is not None:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        if set_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ---------------------------------------------------------------------------------------
# the loop

ParamSpec = Union[None, Iterable[torch.Tensor], Callable[[str, torch.Tensor], bool]]


def trained_parameters(model: nn.Module, params: ParamSpec = None) -> List[torch.Tensor]:
    """The tensors :func:`train` optimises, in order: all of ``model.parameters()`` (None);
    those of ``model.named_parameters()`` for which ``params(name, p)`` is true (a callable);
    or ``params`` itself (an iterable of tensors, which need not belong to the model, e.g.
    a delta applied by a hook). Duplicates (tied weights) count once."""
    if params is None:
        out = list(model.parameters())
    elif callable(params):
        out = [p for n, p in model.named_parameters() if params(n, p)]
    else:
        out = list(params)
    seen, uniq = set(), []
    for p in out:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"trained parameters must be tensors, got {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            uniq.append(p)
    if not uniq:
        raise ValueError("no parameters to train")
    return uniq


@dataclass
class TrainResult:
    """What :func:`train` did. ``losses``: per optimizer step, mean cross-entropy (nats) per
    target token; ``final_loss``: mean of the last 5% of steps (at least one);
    ``n_targets``: target tokens seen over all steps; ``seconds``: wall time of the loop."""

    steps: int
    losses: List[float]
    initial_loss: float
    final_loss: float
    n_trained_parameters: int
    n_targets: int
    seconds: float
    lrs: List[float] = field(default_factory=list)
    optimizer_state_bytes: int = 0  # AdamW's state (moments, step counts) after the last step


def _optimizer(trained: List[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def train(model: nn.Module, examples: Sequence[Example], cfg: TrainConfig, *, pad_id: int,
          params: ParamSpec = None, progress: bool = True,
          on_step: Optional[Callable[[int, nn.Module], None]] = None) -> TrainResult:
    """Train the causal LM ``model`` on ``examples``; the model is changed in place.

    ``model(input_ids, attention_mask, labels)`` must return the mean cross-entropy of the
    labelled positions as ``.loss`` (every transformers ``...ForCausalLM`` does). Only the
    tensors chosen by ``params`` (see :func:`trained_parameters`) are optimised; the model's
    other parameters do not require gradients during the loop and stay bitwise unchanged.
    Inputs go to the device of the model's first parameter. Runs under :func:`deterministic`
    (``cfg.seed``, ``cfg.threads``), in train mode, or in eval mode with ``cfg.dropout`` off
    (the previous mode is restored).

    Each step: draw ``accumulation`` micro-batches of ``cfg.batch_size`` examples from
    :func:`example_order` (seed ``cfg.seed + 1``), weight each micro-batch's mean loss by
    its share of the step's target tokens, back-propagate, clip, and step AdamW at
    :func:`lr_at`. ``on_step(step, model)`` (optional) runs after each optimizer step, with
    the 1-based step number (e.g. to save checkpoints); it must not touch the random state.
    """
    cfg.validate()
    if not examples:
        raise ValueError("no training examples")
    trained = trained_parameters(model, params)
    trained_ids = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if id(p) not in trained_ids and p.requires_grad]
    device = next(model.parameters()).device  # the embedding's, for a model sharded over devices
    was_training = model.training
    n_trained = sum(p.numel() for p in trained)
    losses: List[float] = []
    lrs: List[float] = []
    n_targets = 0
    bar = None
    with deterministic(cfg.seed, cfg.threads):
        for p in frozen:
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        try:
            model.train(cfg.dropout)
            opt = _optimizer(trained, cfg)
            order = example_order(len(examples), cfg.seed + 1)
            bar = _progress_bar(cfg.steps, progress)
            t0 = time.perf_counter()
            for step in bar:
                micro = [collate([examples[next(order)] for _ in range(cfg.batch_size)], pad_id).to(device)
                         for _ in range(cfg.accumulation)]
                counts = [b.n_targets for b in micro]
                total = sum(counts)
                if total == 0:
                    raise ValueError(f"step {step}: the batch has no target tokens (every loss mask is empty)")
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                parts = []
                for b, n in zip(micro, counts):
                    if n == 0:
                        continue
                    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                                use_cache=False)
                    # Weighting by the micro-batch's share of target tokens makes k micro-batches
                    # train like one k-times larger batch (x * 1.0 is exact when k = 1; with
                    # dropout on, only in expectation).
                    loss = out.loss * (n / total)
                    loss.backward()
                    parts.append(loss.detach())
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
                opt.step()
                step_loss = sum(torch.stack(parts).tolist()) if parts else 0.0  # host: once per step
                losses.append(step_loss)
                lrs.append(lr)
                n_targets += total
                if on_step is not None:
                    on_step(step + 1, model)
                if progress:
                    bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
                if (step + 1) % cfg.log_every == 0 or step == 0:
                    logger.info("step %d/%d loss %.4f lr %.2e (%.0fs)", step + 1, cfg.steps, step_loss, lr,
                                time.perf_counter() - t0)
            seconds = time.perf_counter() - t0
            opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                            if isinstance(t, torch.Tensor))
        finally:
            if bar is not None:
                bar.close()
            model.train(was_training)
            for p in frozen:
                p.requires_grad_(True)
    tail = max(1, cfg.steps // 20)
    result = TrainResult(steps=cfg.steps, losses=losses, initial_loss=losses[0],
                         final_loss=sum(losses[-tail:]) / tail, n_trained_parameters=n_trained,
                         n_targets=n_targets, seconds=seconds, lrs=lrs, optimizer_state_bytes=opt_bytes)
    logger.info("trained %d steps in %.1fs: final loss %.4f", cfg.steps, seconds, result.final_loss)
    return result


def _progress_bar(steps: int, enabled: bool):
    from specext._deps import require

    require("tqdm", what="specext.pipelines.training")
    from specext._progress import progress

    return progress(range(steps), desc="train", unit="step", disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------
# saving

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def replace_dir(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Move directory ``src`` to ``dst``, replacing what is there: the old ``dst`` is renamed
    aside first and removed last, so ``dst`` is never a half-written directory."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)
    return dst


def save(model: nn.Module, tokenizer, out_dir: Union[str, Path], metadata: Optional[Dict[str, object]] = None, *,
         metadata_name: str = "training.json", dtype: Optional[str] = None) -> Path:
    """Save ``model`` (``save_pretrained``: config.json, model.safetensors), ``tokenizer`` and
    ``metadata`` (JSON, ``out_dir/metadata_name``) to ``out_dir``, atomically: everything is
    written to a temporary sibling directory that then replaces ``out_dir``
    (:func:`replace_dir`). ``dtype`` (``float32``/``bfloat16``/``float16``) casts the model
    in place before saving; None keeps its dtype."""
    out_dir = Path(out_dir)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model.to(DTYPES[dtype])
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / metadata_name).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s (%s)", out_dir, ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return out_dir
