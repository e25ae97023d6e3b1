"""Batched probe inference: multiple choice by option log-likelihood, open-ended by greedy
generation, with MLP coefficients reduced per prompt as the forward pass streams.

One forward pass over a batch of left-padded prompts serves everything: the hooks reduce
each layer's coefficients to one prompt-level statistic per neuron (with
:func:`specext.ops.category_accumulate`), its key/value cache is reused for the options
(the question prefix is encoded once per question, not once per option), and a copy of
the cache seeds greedy decoding for the open-ended answer.

Multiple-choice conventions follow lm-evaluation-harness: the continuation is
``" " + choice``; ``acc`` picks the highest summed log-likelihood, ``acc_norm`` the highest
log-likelihood divided by the continuation's length in UTF-8 bytes.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .models import LoadedModel, capture, mask
from .probes import MCQ_TEMPLATE, Question, normalize_answer

logger = logging.getLogger(__name__)

POSITIONS = ("question", "last", "all")


@functools.lru_cache(maxsize=None)
def _cache_kwarg(forward) -> str:
    # transformers >= 5.2x renamed past_key_values to cache; older 5.x only knows the old name.
    try:
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


@functools.lru_cache(maxsize=None)
def _accepts(forward, name: str) -> bool:
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _out_cache(out):
    for key in ("cache", "past_key_values"):
        if key in out and out[key] is not None:
            return out[key]
    raise RuntimeError("the model returned no key/value cache; it cannot be scored incrementally")


@dataclass
class QuestionResult:
    mcq_pred: int = -1
    mcq_pred_norm: int = -1
    mcq_correct: bool = False
    mcq_norm_correct: bool = False
    option_logprobs: List[float] = field(default_factory=list)
    open_text: str = ""
    open_correct: bool = False


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (B, S) left-padded
    attention_mask: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (B, S)
    select: torch.Tensor  # (B, S) bool: positions whose coefficients form the prompt statistic
    lengths: torch.Tensor  # (B,) real prompt tokens


def _question_span(template: str, question: str) -> Tuple[int, int]:
    start = template.index("{question}")
    return start, start + len(question)


def _select_row(positions: str, template: str, question: str, ids, special, offsets) -> List[bool]:
    n = len(ids)
    if positions == "last":
        return [i == n - 1 for i in range(n)]
    if positions == "all":
        return [not sp for sp in special]
    lo, hi = _question_span(template, question)
    sel = [(not special[i]) and e > s and s < hi and e > lo for i, (s, e) in enumerate(offsets)]
    if not any(sel):  # a tokenizer without offsets: fall back to the last token
        sel = [i == n - 1 for i in range(n)]
    return sel


def encode_prompts(tokenizer, questions: Sequence[Question], positions: str, template: str = MCQ_TEMPLATE,
                   device: torch.device = torch.device("cpu")) -> EncodedBatch:
    """Tokenise prompts, left-pad them, and mark the positions to reduce.

    ``positions``: ``question`` (tokens overlapping the question text), ``last`` (the last
    prompt token), ``all`` (every prompt token but special ones). Each distinct prompt is
    tokenised once (PSS batches repeat one prompt under many masks).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    uniq: Dict[str, int] = {}
    for q in questions:
        uniq.setdefault(q.question, len(uniq))
    texts = list(uniq)
    prompts = [template.format(question=t) for t in texts]
    try:
        enc = tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=positions == "question",
                        return_special_tokens_mask=True)
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        if positions != "question":
            raise
        logger.warning("tokenizer %s gives no character offsets: --positions question falls back to the last "
                       "prompt token", type(tokenizer).__name__)
        positions = "last"
        enc = tokenizer(prompts, add_special_tokens=True, return_special_tokens_mask=True)
    sel_u = [_select_row(positions, template, t, enc["input_ids"][u], enc["special_tokens_mask"][u],
                         enc["offset_mapping"][u] if positions == "question" else None) for u, t in enumerate(texts)]
    rows = [uniq[q.question] for q in questions]
    S = max(len(enc["input_ids"][u]) for u in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_l, att_l, sel_l = [], [], []
    for u in rows:
        x = enc["input_ids"][u]
        off = S - len(x)
        ids_l.append([pad] * off + list(x))
        att_l.append([0] * off + [1] * len(x))
        sel_l.append([False] * off + sel_u[u])
    input_ids = torch.tensor(ids_l, dtype=torch.long)
    attn = torch.tensor(att_l, dtype=torch.long)
    select = torch.tensor(sel_l, dtype=torch.bool)
    position_ids = (attn.cumsum(1) - 1).clamp_min(0)
    return EncodedBatch(input_ids.to(device), attn.to(device), position_ids.to(device), select.to(device),
                        attn.sum(1).to(device))


def continuation_ids(tokenizer, prompt: str, cont: str) -> List[int]:
    """Token ids of ``cont`` after ``prompt``, split the lm-evaluation-harness way
    (encode the whole, drop the prompt's tokens) when the prompt's tokens are a prefix of
    the whole; otherwise the continuation encoded alone."""
    ctx = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    whole = tokenizer(prompt + cont, add_special_tokens=True)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return whole[len(ctx):]
    return tokenizer(cont, add_special_tokens=False)["input_ids"]


class PromptStats:
    """Per-batch prompt-level statistic of every neuron: ``stats[b, l, n]`` = weighted mean
    over prompt ``b``'s selected tokens of ``|m_n|`` at layer ``l`` (the CPU/CUDA kernel
    streams it out of the forward pass; nothing per token is stored)."""

    def __init__(self, n_layers: int, d_ff: int, stat: str = "abs"):
        self.n_layers, self.d_ff, self.stat = n_layers, d_ff, stat
        self.sums: Optional[torch.Tensor] = None
        self.counts: Optional[torch.Tensor] = None
        self._labels = self._weights = None

    def begin(self, batch: EncodedBatch) -> None:
        B, S = batch.select.shape
        dev = batch.select.device
        n_sel = batch.select.sum(1, keepdim=True).clamp_min(1)
        rows = torch.arange(B, device=dev)[:, None].expand(B, S)
        self._labels = torch.where(batch.select, rows, torch.full_like(rows, -1)).reshape(-1)
        self._weights = (batch.select.float() / n_sel).reshape(-1)
        self.sums = torch.zeros((B, self.n_layers, self.d_ff), dtype=torch.float32, device=dev)
        self.counts = torch.zeros((self.n_layers, B), dtype=torch.float32, device=dev)

    def __call__(self, layer: int, m: torch.Tensor) -> None:
        if self._labels is None:  # continuation / decoding passes: nothing to reduce
            return
        flat = m.reshape(-1, m.shape[-1])
        if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            flat = flat.float()
        ops.category_accumulate(flat, self._labels, weights=self._weights, stat=self.stat,
                                sums=self.sums[:, layer, :], counts=self.counts[layer])

    def end(self) -> None:
        self._labels = self._weights = None


class Scorer:
    """Runs batches of questions through a loaded model.

    ``score(questions)`` returns one :class:`QuestionResult` per question and, when
    ``stats`` is given, leaves that batch's prompt statistics in it.
    """

    def __init__(self, lm: LoadedModel, *, positions: str = "question", open_ended: bool = True,
                 max_new_tokens: int = 12, template: str = MCQ_TEMPLATE):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.lm, self.positions, self.open_ended = lm, positions, open_ended
        self.max_new_tokens, self.template = max_new_tokens, template
        self._cont_cache: Dict[Tuple[str, str], List[int]] = {}

    def _cont(self, prompt: str, choice: str) -> List[int]:
        key = (prompt, choice)
        if key not in self._cont_cache:
            ids = continuation_ids(self.lm.tokenizer, prompt, " " + choice)
            if not ids:
                raise ValueError(f"choice {choice!r} encodes to no tokens")
            self._cont_cache[key] = ids
        return self._cont_cache[key]

    @torch.inference_mode()
    def score(self, questions: Sequence[Question], *, stats: Optional[PromptStats] = None,
              row_masks: Optional[Callable[[int], Optional[torch.Tensor]]] = None) -> List[QuestionResult]:
        """``row_masks(layer)`` -> ``(B, d_ff)`` multiplier per question row (or None)."""
        lm = self.lm
        batch = encode_prompts(lm.tokenizer, questions, self.positions, self.template, lm.device)
        B = len(questions)
        results = [QuestionResult() for _ in questions]
        current_rows: List[Optional[torch.Tensor]] = [None]  # row index map of the running pass

        def masks_for(layer: int):
            if row_masks is None:
                return None
            m = row_masks(layer)
            if m is None or m.dim() == 1 or current_rows[0] is None:
                return m
            return m.index_select(0, current_rows[0])

        sink = stats if stats is not None else (lambda layer, m: None)
        if stats is not None:
            stats.begin(batch)
        with capture(lm.sites, sink), mask(lm.sites, masks_for):
            current_rows[0] = torch.arange(B, device=lm.device)
            extra = {}
            if lm.has_lm_head and _accepts(type(lm.model).forward, "logits_to_keep"):
                extra["logits_to_keep"] = 1  # only the last prompt position's logits are used
            out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=lm.has_lm_head, **extra)
            if stats is not None:
                stats.end()
            if not lm.has_lm_head:
                return results
            last_logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (B, V)
            cache = _out_cache(out)
            gen_cache = copy.deepcopy(cache) if self.open_ended else None
            self._multiple_choice(questions, batch, cache, last_logp, results, current_rows)
            if self.open_ended:
                self._greedy(questions, batch, gen_cache, last_logp, results, current_rows)
        return results

    def _multiple_choice(self, questions, batch, cache, last_logp, results, current_rows):
        lm = self.lm
        prompts = [self.template.format(question=q.question) for q in questions]
        conts, owners = [], []
        for b, q in enumerate(questions):
            for c in q.choices:
                conts.append(self._cont(prompts[b], c))
                owners.append(b)
        n_opts = [len(q.choices) for q in questions]
        owner_t = torch.tensor(owners, device=lm.device)
        # log p(c_1 | prompt) comes from the prompt pass; only options of two or more tokens
        # need a second pass (over their rows alone), on the prompt cache expanded to them.
        first_ids = torch.tensor([c[0] for c in conts], dtype=torch.long, device=lm.device)
        first = last_logp.index_select(0, owner_t).gather(1, first_ids[:, None])[:, 0].double()
        multi = [r for r, c in enumerate(conts) if len(c) > 1]
        rest = torch.zeros_like(first)
        if multi:
            sub = [conts[r] for r in multi]
            rows_t = owner_t[torch.tensor(multi, device=lm.device)]
            L = max(len(c) for c in sub)
            pad = lm.tokenizer.pad_token_id or 0
            ids = torch.tensor([c + [pad] * (L - len(c)) for c in sub], dtype=torch.long, device=lm.device)
            cmask = torch.tensor([[1] * len(c) + [0] * (L - len(c)) for c in sub], dtype=torch.long, device=lm.device)
            if len(multi) == len(conts) and all(n == n_opts[0] for n in n_opts):
                cache.batch_repeat_interleave(n_opts[0])
            else:
                cache.batch_select_indices(rows_t)
            # The last token of an option predicts nothing we score: feed tokens 0..L-2.
            attn = torch.cat([batch.attention_mask.index_select(0, rows_t), cmask[:, :-1]], dim=1)
            pos = batch.lengths.index_select(0, rows_t)[:, None] + torch.arange(L - 1, device=lm.device)[None, :]
            current_rows[0] = rows_t
            out = lm.model(input_ids=ids[:, :-1], attention_mask=attn, position_ids=pos, use_cache=True,
                           **{_cache_kwarg(type(lm.model).forward): cache})
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # (M, L-1, V)
            part = (logp.gather(2, ids[:, 1:, None])[..., 0] * cmask[:, 1:]).sum(1)
            rest[torch.tensor(multi, device=lm.device)] = part.double()
        scores = (first + rest).tolist()
        r = 0
        for b, q in enumerate(questions):
            sc = scores[r : r + n_opts[b]]
            r += n_opts[b]
            norm = [s / len((" " + ch).encode("utf-8")) for s, ch in zip(sc, q.choices)]
            res = results[b]
            res.option_logprobs = sc
            res.mcq_pred = max(range(len(sc)), key=lambda i: sc[i])
            res.mcq_pred_norm = max(range(len(norm)), key=lambda i: norm[i])
            res.mcq_correct = res.mcq_pred == q.answer
            res.mcq_norm_correct = res.mcq_pred_norm == q.answer

    def _greedy(self, questions, batch, cache, last_logp, results, current_rows):
        lm = self.lm
        tok = lm.tokenizer
        B = len(questions)
        current_rows[0] = torch.arange(B, device=lm.device)
        stop_ids = {i for i in (tok.eos_token_id,) if i is not None}
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        stop_ids.update(nl[-1:])
        nxt = last_logp.argmax(-1)  # (B,)
        generated = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=lm.device)
        attn = batch.attention_mask
        for step in range(self.max_new_tokens):
            for b in range(B):
                if not done[b]:
                    t = int(nxt[b])
                    if t in stop_ids:
                        done[b] = True
                    else:
                        generated[b].append(t)
            if bool(done.all()) or step == self.max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=lm.device)], dim=1)
            pos = (batch.lengths + step)[:, None]
            out = lm.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                           **{_cache_kwarg(type(lm.model).forward): cache})
            nxt = out.logits[:, -1, :].argmax(-1)
        for b, q in enumerate(questions):
            text = tok.decode(generated[b], skip_special_tokens=True).split("\n")[0].strip()
            results[b].open_text = text
            results[b].open_correct = open_answer_correct(text, q)


def open_answer_correct(text: str, q: Question) -> bool:
    """True when a normalised accepted answer occurs in the normalised generation as whole words."""
    gen = f" {normalize_answer(text)} "
    return any(f" {normalize_answer(a)} " in gen for a in q.accepted_answers() if normalize_answer(a))
