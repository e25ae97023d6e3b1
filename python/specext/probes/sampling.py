"""Sampled open-ended answers and answer-position hidden states: the inputs of the
hallucination measures (:mod:`specext.metrics.hallucination`, issue 11).

Both use exactly the scorer's open-ended path (:class:`specext.probes.scoring.Scorer`): the
same template (``Question: {question}\\nAnswer:``), the same left-padded encoding
(:func:`specext.probes.scoring.encode_prompts`, with its position-limit check), and for
sampling the same decoding loop and stopping rule (:func:`specext.probes.scoring.generate`:
EOS or newline, at most ``max_new_tokens``, first line stripped); only the choice of the
next token differs.

Sampling is seeded per answer, not per batch: answer ``j`` of a question draws its noise
from its own generator, seeded by ``sha256(seed, question text, concept, j)``, on the CPU.
So the answers do not depend on the batch size, on the order of the questions or on the
device's random generator, and two models (before and after fine-tuning) sampled with one
seed see the same noise (common random numbers: their differences come from the models).
The next token is drawn by the Gumbel-max trick, ``argmax(logits / T - ln(-ln u))`` with
``u`` uniform, which is an exact draw from ``softmax(logits / T)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import List, Sequence

import torch

from specext.models.loading import LoadedModel
from specext.probes.probeset import Question
from specext.probes.scoring import (HalvingBatches, PromptLimit, Scorer, _accepts, _out_cache, encode_prompts,
                                    generate)

logger = logging.getLogger(__name__)


def answer_seed(seed: int, question: Question, j: int) -> int:
    """The seed of answer ``j`` to ``question``: the first 8 bytes of
    ``sha256(f"{seed}|{question.question}|{question.concept}|{j}")``, as a non-negative int63."""
    h = hashlib.sha256(f"{seed}|{question.question}|{question.concept}|{j}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _GumbelChooser:
    """``choose(step, logits)`` for :func:`specext.probes.scoring.generate`: one CPU
    generator per row, advanced by one ``(V,)`` uniform draw per step whether or not the row
    is still generating (so a row's noise depends only on its seed and the step)."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        V = logits.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, dtype=torch.float64) for g in self.gens])
        tiny = torch.finfo(torch.float64).tiny
        gumbel = -torch.log(-torch.log(u.clamp_(tiny, 1.0 - 1e-16)))
        z = logits.double() / self.temperature + gumbel.to(logits.device, non_blocking=True)
        return z.argmax(-1)


def _check_lm(lm: LoadedModel, what: str) -> None:
    if not isinstance(lm, LoadedModel):
        raise TypeError(f"{what}: lm must be a specext.models.LoadedModel (specext.models.load_model), "
                        f"got {type(lm).__name__}")


@torch.inference_mode()
def sample_answers(lm: LoadedModel, questions: Sequence[Question], n: int, temperature: float, seed: int,
                   max_new_tokens: int = 12, batch_size: int = 8) -> List[List[str]]:
    """``n`` sampled open-ended answers to each question, at ``temperature`` (> 0): one list
    of ``n`` strings per question, in order. The prompt, encoding, stopping and the answer
    text are the scorer's greedy open-ended path's (module docstring); the next token is
    a draw from ``softmax(logits / temperature)`` with per-answer seeds (:func:`answer_seed`),
    so the same ``seed`` gives the same answers whatever ``batch_size`` (on the same device
    and dtype; CPU runs are bitwise reproducible).

    ``batch_size`` questions are encoded per forward pass; their prompt cache is expanded to
    ``n`` rows each, so a decoding step runs ``batch_size * n`` rows (halved on
    out-of-memory, :class:`specext.probes.scoring.HalvingBatches`).
    """
    _check_lm(lm, "sample_answers")
    if not lm.has_lm_head:
        raise ValueError(f"{lm.path}: sampling answers needs a causal LM with an LM head ({lm.architecture} has none)")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (answers per question) must be an integer >= 1, got {n!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (greedy answers come from the scorer), "
                         f"got {temperature!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n, questions = int(n), list(questions)
    scorer = Scorer(lm, positions="last", open_ended=True, max_new_tokens=max_new_tokens)
    out: List[List[str]] = []

    def compute(batch: Sequence[Question]) -> List[List[str]]:
        enc = encode_prompts(lm.tokenizer, batch, "last", scorer.template, lm.device, limit=scorer.limit)
        extra = {"logits_to_keep": 1} if _accepts(type(lm.model).forward, "logits_to_keep") else {}
        res = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                       use_cache=True, **extra)
        cache = _out_cache(res)
        cache.batch_repeat_interleave(n)
        first = res.logits[:, -1, :].repeat_interleave(n, dim=0)
        chooser = _GumbelChooser([answer_seed(seed, q, j) for q in batch for j in range(n)], float(temperature))
        texts = generate(lm, enc.attention_mask.repeat_interleave(n, dim=0), enc.lengths.repeat_interleave(n, dim=0),
                         cache, first, max_new_tokens, chooser)
        return [texts[i * n:(i + 1) * n] for i in range(len(batch))]

    HalvingBatches(batch_size, lm.device, "sampling").run(questions, compute, lambda b, r: out.extend(r))
    logger.debug("sampled %d answers to each of %d questions (T=%g, seed %d)", n, len(questions), temperature, seed)
    return out


@torch.inference_mode()
def answer_hidden_states(lm: LoadedModel, questions: Sequence[Question], batch_size: int = 8) -> torch.Tensor:
    """``(Q, d_model)`` float32 CPU tensor: each question's last-layer hidden state at the
    answer position, i.e. at the last prompt token of the open-ended prompt (the last
    non-special token, :func:`specext.probes.scoring.encode_prompts` ``positions="last"``),
    where the model forms its answer.

    "Last layer" is ``output_hidden_states[-1]`` as transformers returns it: the output of
    the final layer *after* the model's final norm (transformers ties ``hidden_states[-1]``
    to ``last_hidden_state``), i.e. what the LM head reads. Prompts are left-padded with
    explicit position ids, so a row's state does not depend on the batch (checked against
    unbatched forwards in ``tests/test_sampling.py``).
    """
    _check_lm(lm, "answer_hidden_states")
    questions = list(questions)
    if not questions:
        return torch.empty((0, _d_model(lm)), dtype=torch.float32)
    scorer = Scorer(lm, positions="last", open_ended=False)
    limit = scorer.limit
    if limit is not None:  # only the prompt itself must fit: nothing is generated
        limit = PromptLimit(limit.limit, name=limit.name)
    parts: List[torch.Tensor] = []

    def compute(batch: Sequence[Question]) -> torch.Tensor:
        enc = encode_prompts(lm.tokenizer, batch, "last", scorer.template, lm.device, limit=limit)
        kwargs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                      output_hidden_states=True, use_cache=False)
        if lm.has_lm_head and _accepts(type(lm.model).forward, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        res = lm.model(**kwargs)
        hs = res.hidden_states[-1]  # (B, S, d_model), final norm applied
        S = enc.select.shape[1]
        pos = (enc.select.long() * torch.arange(1, S + 1, device=enc.select.device)).argmax(1)  # last selected
        idx = pos.to(hs.device)[:, None, None].expand(-1, 1, hs.shape[-1])
        return hs.gather(1, idx)[:, 0, :].float().cpu()

    HalvingBatches(batch_size, lm.device, "hidden states").run(questions, compute, lambda b, r: parts.append(r))
    return torch.cat(parts, 0)


def _d_model(lm: LoadedModel) -> int:
    cfg = lm.model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{lm.path}: cannot tell the hidden size from the config")
