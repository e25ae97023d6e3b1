"""Batched probe inference: multiple choice by option log-likelihood, open-ended by greedy
generation, with MLP coefficients reduced per prompt as the forward pass streams.

One forward pass over a batch of left-padded prompts serves everything: the hooks reduce
each layer's coefficients to one prompt-level statistic per neuron (with
:func:`specext.ops.category_accumulate`), its key/value cache is reused for the options
(the question prefix is encoded once per question, not once per option), and a copy of
the cache seeds greedy decoding for the open-ended answer.

Multiple-choice conventions follow lm-evaluation-harness: the continuation is
``" " + choice``; ``acc`` picks the highest summed log-likelihood, ``acc_norm`` the highest
log-likelihood divided by the number of characters of the choice text without the leading
space (``len(choice)``, as lm-evaluation-harness's ``process_results`` does; not bytes).
Ties go to the first option (``numpy.argmax``).

Open-ended answers are matched against the *answer span* of the generation (see
:func:`answer_span` and :func:`open_answer_correct`), never anywhere in free text.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from specext.kernels import ops
from specext.models.loading import LoadedModel
from specext.models.hooks import capture, mask
from specext.probes.probeset import MCQ_TEMPLATE, Question, normalize_answer

logger = logging.getLogger(__name__)

POSITIONS = ("question", "last", "all", "subject", "subject-last")
_SUBJECT_POSITIONS = ("subject", "subject-last")
_OFFSET_POSITIONS = ("question",) + _SUBJECT_POSITIONS
TRUNCATE = ("left",)  # --truncate: how a prompt longer than the model's positions is cut (None: an error)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def position_limit(model) -> Optional[int]:
    """The model's number of positions (config ``max_position_embeddings``, ``n_positions``
    or ``n_ctx``), or None when its config names none (no limit is checked)."""
    cfg = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _limit_name(model) -> str:
    cfg = getattr(model, "config", None)
    return next((k for k in _POSITION_KEYS if isinstance(getattr(cfg, k, None), int)), "positions")


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

    @property
    def valid(self) -> torch.Tensor:
        """``(B,)`` bool: rows with at least one selected token. A ``subject`` prompt whose
        question does not name its concept has none; its prompt statistic is zero and must
        be left out of any mean."""
        return self.select.any(1)


def _question_span(template: str, question: str) -> Tuple[int, int]:
    start = template.index("{question}")
    return start, start + len(question)


def subject_span(question: str, concept: str) -> Optional[Tuple[int, int]]:
    """Character span ``[lo, hi)`` of the concept's name in the question text, or None.

    The search is case-insensitive (a probe may write "the united states" for the concept
    "United States") and takes the first occurrence as a whole word, else the first
    occurrence inside a longer word ("Aldorian" for "Aldoria"). Only the concept string
    itself is searched: aliases and paraphrases do not count.
    """
    name = concept.strip()
    if not name:
        return None
    m = (re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", question, flags=re.IGNORECASE)
         or re.search(re.escape(name), question, flags=re.IGNORECASE))
    return (m.start(), m.end()) if m else None


def _overlapping(offsets, special, lo: int, hi: int) -> List[bool]:
    """Tokens (not special, not empty) whose character span overlaps ``[lo, hi)``."""
    return [(not special[i]) and e > s and s < hi and e > lo for i, (s, e) in enumerate(offsets)]


def _last_only(sel: List[bool]) -> List[bool]:
    out = [False] * len(sel)
    for i in range(len(sel) - 1, -1, -1):
        if sel[i]:
            out[i] = True
            break
    return out


def _select_row(positions: str, template: str, question: str, concept: str, ids, special, offsets) -> List[bool]:
    n = len(ids)
    if positions == "last":
        # The last non-special token: an encoder's tokenizer appends [SEP], whose
        # coefficients say nothing about the question; for causal LMs it is the last token.
        return _last_only([not sp for sp in special])
    if positions == "all":
        return [not sp for sp in special]
    lo, hi = _question_span(template, question)
    if positions in _SUBJECT_POSITIONS:
        span = subject_span(question, concept)
        if span is None:
            return [False] * n  # no subject token: the row is invalid (EncodedBatch.valid)
        sel = _overlapping(offsets, special, lo + span[0], lo + span[1])
        return _last_only(sel) if positions == "subject-last" else sel
    sel = _overlapping(offsets, special, lo, hi)
    if not any(sel):  # a tokenizer without offsets: fall back to the last token
        sel = _last_only([not sp for sp in special])
    return sel


_WARNED_MISSING: set = set()
_WARNED_TRUNCATED: set = set()


@dataclass
class PromptLimit:
    """The position limit :func:`encode_prompts` checks: a prompt plus ``reserve(question)``
    tokens (the longest option, or the generated answer) must fit in ``limit`` positions
    (``name``: the config key it came from). Otherwise a ``ValueError`` naming the question's
    ``file:line`` and the limit, or with ``truncate="left"`` the prompt's first tokens are
    dropped (one warning per question) and the question's source is added to ``truncated``."""
    limit: int
    reserve: Callable[[Question], int] = lambda q: 0
    truncate: Optional[str] = None
    name: str = "max_position_embeddings"
    truncated: set = field(default_factory=set)


def encode_prompts(tokenizer, questions: Sequence[Question], positions: str, template: str = MCQ_TEMPLATE,
                   device: torch.device = torch.device("cpu"), limit: Optional[PromptLimit] = None) -> EncodedBatch:
    """Tokenise prompts, left-pad them, and mark the positions to reduce.

    ``positions``:

    - ``question``: tokens overlapping the question text (the template's words left out);
    - ``last``: the last prompt token that is not a special token (an encoder's trailing
      ``[SEP]`` is skipped; for causal LMs this is the last prompt token);
    - ``all``: every prompt token but special ones;
    - ``subject``: tokens overlapping the concept's name in the question text (found by
      :func:`subject_span`: case-insensitive, first occurrence);
    - ``subject-last``: the last of the ``subject`` tokens, where factual recall is read out.

    A question that does not contain its concept's name has no ``subject`` token: its row of
    ``select`` is all False (``EncodedBatch.valid`` is False there) and one warning per call
    counts such prompts. ``question``, ``subject`` and ``subject-last`` need character
    offsets (a fast tokenizer); ``subject``/``subject-last`` raise ``ValueError`` without
    them, ``question`` falls back to ``last`` with a warning. Each distinct prompt is
    tokenised once (PSS batches repeat one prompt under many masks). ``limit``: see
    :class:`PromptLimit` (checked before any forward pass).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    no_offsets = (f"--positions {positions} needs character offsets, which tokenizer {type(tokenizer).__name__} "
                  "(a slow, Python tokenizer) does not give; load a fast tokenizer (tokenizer.json) or use "
                  "--positions last or all")
    if positions in _SUBJECT_POSITIONS and getattr(tokenizer, "is_fast", True) is False:
        raise ValueError(no_offsets)
    uniq: Dict[str, int] = {}
    for q in questions:
        uniq.setdefault(q.question, len(uniq))
    texts = list(uniq)
    prompts = [template.format(question=t) for t in texts]
    want_offsets = positions in _OFFSET_POSITIONS
    enc = None
    if want_offsets:
        try:
            enc = tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=True,
                            return_special_tokens_mask=True)
        except NotImplementedError:  # slow (Python) tokenizers have no offsets ...
            enc = None
        if enc is not None and "offset_mapping" not in enc:  # ... or leave them out silently
            enc = None
        if enc is None:
            if positions in _SUBJECT_POSITIONS:
                raise ValueError(no_offsets)
            logger.warning("tokenizer %s gives no character offsets: --positions question falls back to the last "
                           "prompt token", type(tokenizer).__name__)
            positions, want_offsets = "last", False
    if enc is None:
        enc = tokenizer(prompts, add_special_tokens=True, return_special_tokens_mask=True)
    if limit is not None:
        enc = _fit_positions(enc, questions, uniq, limit, want_offsets)
    # The selection of a subject position depends on the concept too, not only on the prompt.
    sel_cache: Dict[Tuple[int, str], List[bool]] = {}

    def sel_of(q: Question) -> List[bool]:
        u = uniq[q.question]
        key = (u, q.concept if positions in _SUBJECT_POSITIONS else "")
        if key not in sel_cache:
            sel_cache[key] = _select_row(positions, template, q.question, q.concept, enc["input_ids"][u],
                                         enc["special_tokens_mask"][u],
                                         enc["offset_mapping"][u] if want_offsets else None)
        return sel_cache[key]

    rows = [uniq[q.question] for q in questions]
    S = max(len(enc["input_ids"][u]) for u in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_l, att_l, sel_l = [], [], []
    missing: List[str] = []
    for q, u in zip(questions, rows):
        x = enc["input_ids"][u]
        off = S - len(x)
        sel = sel_of(q)
        if not any(sel):
            missing.append(q.concept)
        ids_l.append([pad] * off + list(x))
        att_l.append([0] * off + [1] * len(x))
        sel_l.append([False] * off + sel)
    new = [c for c in dict.fromkeys(missing) if (positions, c) not in _WARNED_MISSING]
    if missing:
        # Once per concept and positions per process: PSS re-encodes the same prompts many times.
        _WARNED_MISSING.update((positions, c) for c in new)
        names = new or list(dict.fromkeys(missing))
        why = "the question does not contain its concept's name" if positions in _SUBJECT_POSITIONS else "only special tokens"
        (logger.warning if new else logger.debug)("--positions %s: %d of %d prompts have no selected token (%s: %s%s); their rows are invalid "
                       "(EncodedBatch.valid / PromptStats.valid False) and their statistic is zero", positions,
                       len(missing), len(questions), why, ", ".join(map(repr, names[:3])),
                       ", ..." if len(names) > 3 else "")
    input_ids = torch.tensor(ids_l, dtype=torch.long)
    attn = torch.tensor(att_l, dtype=torch.long)
    select = torch.tensor(sel_l, dtype=torch.bool)
    position_ids = (attn.cumsum(1) - 1).clamp_min(0)
    return EncodedBatch(input_ids.to(device), attn.to(device), position_ids.to(device), select.to(device),
                        attn.sum(1).to(device))


def _fit_positions(enc, questions: Sequence[Question], uniq: Dict[str, int], lim: PromptLimit, offsets: bool):
    """Check every prompt against ``lim``; cut too long ones from the left (``--truncate left``)."""
    keys = ["input_ids", "special_tokens_mask"] + (["offset_mapping"] if offsets else [])
    out = {k: list(enc[k]) for k in keys}
    for q in questions:
        u = uniq[q.question]
        n, extra = len(enc["input_ids"][u]), lim.reserve(q)
        if n + extra <= lim.limit:
            continue
        where = q.source or repr(q.question[:60])
        keep = lim.limit - extra
        if lim.truncate != "left" or keep < 1:
            raise ValueError(f"{where}: the prompt is {n} tokens and needs {extra} more positions for its options or "
                             f"generated answer ({n + extra} in all), past the model's {lim.limit} positions "
                             f"({lim.name} = {lim.limit})"
                             + ("; even --truncate left cannot make room" if lim.truncate == "left" else
                                "; shorten the question or pass --truncate left"))
        if len(out["input_ids"][u]) > keep:
            for k in keys:
                out[k][u] = list(enc[k][u])[n - keep:]
        if where not in lim.truncated:
            lim.truncated.add(where)
            if where not in _WARNED_TRUNCATED:
                _WARNED_TRUNCATED.add(where)
                logger.warning("%s: prompt of %d tokens (+%d for the answer) is past the model's %d positions (%s): "
                               "--truncate left keeps its last %d tokens", where, n, extra, lim.limit, lim.name, keep)
    return out


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
    streams it out of the forward pass; nothing per token is stored).

    ``valid`` (``(B,)`` bool, set by :meth:`begin`) is False for prompts with no selected
    token (``subject`` positions on a question that does not name its concept): their
    ``sums`` rows are zero and must not enter a mean over prompts.

    The hooks call the kernel's unchecked mode (``category_accumulate(errors=)``): a bad
    label is skipped and recorded on the device, so the forward pass issues no host
    synchronisation from specext; :meth:`end` reads the ``(n_layers, 3)`` record once per
    batch and raises ``ValueError`` naming the label and the layer."""

    def __init__(self, n_layers: int, d_ff: int, stat: str = "abs",
                 devices: Optional[Sequence[torch.device]] = None):
        """``devices``: each layer's device (:attr:`LoadedModel.layer_devices`) for a model
        split over devices; layer ``l``'s statistics then live on its device, in their own
        ``(B, d_ff)`` tensor (``layer_sums[l]``). Default: every layer on the batch's device,
        one ``(B, L, d_ff)`` tensor of which ``layer_sums[l]`` are views."""
        if devices is not None and len(devices) != n_layers:
            raise ValueError(f"PromptStats: {len(devices)} layer devices for {n_layers} layers")
        ops._check_stat(stat)  # the hooks' calls skip the public argument checks
        self.n_layers, self.d_ff, self.stat = n_layers, d_ff, stat
        self.devices = None if devices is None else [torch.device(d) for d in devices]
        self.layer_sums: List[torch.Tensor] = []
        self.valid: Optional[torch.Tensor] = None
        self._sums: Optional[torch.Tensor] = None
        self._counts: List[torch.Tensor] = []
        self._inputs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._labels = self._weights = None
        self._errors: Optional[List[torch.Tensor]] = None
        self._home = torch.device("cpu")

    @property
    def sums(self) -> Optional[torch.Tensor]:
        """``(B, L, d_ff)`` on the batch's device: the statistics themselves, or, when the layers
        live on several devices, a gathered copy (use ``layer_sums`` to avoid it)."""
        if self._sums is not None or not self.layer_sums:
            return self._sums
        return torch.stack([x.to(self._home) for x in self.layer_sums], 1)

    @property
    def counts(self) -> Optional[torch.Tensor]:
        """``(L, B)`` selected tokens' total weight per layer and prompt (gathered, as ``sums``)."""
        if not self._counts:
            return None
        return self._counts_all if self._sums is not None else torch.stack([c.to(self._home) for c in self._counts])

    def begin(self, batch: EncodedBatch) -> None:
        B, S = batch.select.shape
        dev = batch.select.device
        n_sel = batch.select.sum(1, keepdim=True).clamp_min(1)
        rows = torch.arange(B, device=dev)[:, None].expand(B, S)
        labels = torch.where(batch.select, rows, torch.full_like(rows, -1)).reshape(-1)
        weights = (batch.select.float() / n_sel).reshape(-1)
        L, D = self.n_layers, self.d_ff
        self._home, self._labels, self._weights = dev, labels, weights
        if self.devices is None:
            self._sums = torch.zeros((B, L, D), dtype=torch.float32, device=dev)
            counts = torch.zeros((L, B), dtype=torch.float32, device=dev)
            errors = torch.zeros((L, 3), dtype=torch.int64, device=dev)
            self.layer_sums = [self._sums[:, l, :] for l in range(L)]
            self._counts_all, self._counts = counts, [counts[l] for l in range(L)]
            self._errors = [errors[l] for l in range(L)]
            self._inputs = [(labels, weights)] * L
        else:
            # Labels and weights go to each device once per batch, not once per layer.
            placed = {}
            for d in self.devices:
                if d not in placed:
                    placed[d] = (labels.to(d), weights.to(d))
            self._sums = None
            self.layer_sums = [torch.zeros((B, D), dtype=torch.float32, device=d) for d in self.devices]
            self._counts = [torch.zeros((B,), dtype=torch.float32, device=d) for d in self.devices]
            self._errors = [torch.zeros((3,), dtype=torch.int64, device=d) for d in self.devices]
            self._inputs = [placed[d] for d in self.devices]
        self.valid = batch.valid

    def __call__(self, layer: int, m: torch.Tensor) -> None:
        if self._errors is None:  # continuation / decoding passes: nothing to reduce
            return
        flat = m.reshape(-1, m.shape[-1])
        if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            flat = flat.float()
        labels, weights = self._inputs[layer]
        ops._accumulate_unchecked(flat, labels, weights, self.layer_sums[layer], self._counts[layer],
                                  self._errors[layer], self.stat)

    def end(self) -> None:
        """Stops the reduction (later passes of the batch are not prompts) and reads the label
        error record: the one host synchronisation per batch that the statistic costs."""
        errors, self._errors, self._inputs, self._labels, self._weights = self._errors, None, [], None, None
        if errors:
            ops.check_label_errors(torch.stack([e.to(self._home) for e in errors]), self.layer_sums[0].shape[0],
                                   row_name="layer")


def identical_options(tokenizer, questions: Sequence[Question], template: str = MCQ_TEMPLATE) -> Dict[str, int]:
    """Questions whose options the model cannot tell apart: two or more choices whose
    continuations tokenize to the same ids (e.g. all to the unknown token), so that the
    scorer picks the first of them by its tie rule. Returns ``{"file:line": n}`` with ``n``
    the number of distinct option encodings (1: every option is the same, the question is
    always answered with option A). Such questions are scored and recorded, not rejected:
    a run warns and lists them in ``summary.json`` (``warnings``)."""
    out: Dict[str, int] = {}
    for q in questions:
        prompt = template.format(question=q.question)
        enc = {tuple(continuation_ids(tokenizer, prompt, " " + c)) for c in q.choices}
        if len(enc) < len(q.choices):
            out[q.source or q.question] = len(enc)
    return out


class Scorer:
    """Runs batches of questions through a loaded model.

    ``score(questions)`` returns one :class:`QuestionResult` per question and, when
    ``stats`` is given, leaves that batch's prompt statistics in it.
    """

    def __init__(self, lm: LoadedModel, *, positions: str = "question", open_ended: bool = True,
                 max_new_tokens: int = 12, template: str = MCQ_TEMPLATE, truncate: Optional[str] = None):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if truncate is not None and truncate not in TRUNCATE:
            raise ValueError(f"truncate must be None or one of {TRUNCATE}, got {truncate!r}")
        self.lm, self.positions, self.open_ended = lm, positions, open_ended
        self.max_new_tokens, self.template = max_new_tokens, template
        self._cont_cache: Dict[Tuple[str, str], List[int]] = {}
        n = position_limit(lm.model)
        # Options and the generated answer each continue from the prompt's cache: the longer counts.
        self.limit = None if n is None else PromptLimit(n, self._reserve, truncate, _limit_name(lm.model))

    @property
    def truncated(self) -> set:
        """Sources (``file:line``) of the questions whose prompts were cut (``truncate="left"``)."""
        return self.limit.truncated if self.limit is not None else set()

    def _reserve(self, q: Question) -> int:
        if not self.lm.has_lm_head:
            return 0
        prompt = self.template.format(question=q.question)
        longest = max((len(self._cont(prompt, c)) for c in q.choices), default=0)
        return max(longest, self.max_new_tokens if self.open_ended else 0)

    def check(self, questions: Sequence[Question]) -> int:
        """Check every question against the model's positions before any forward pass
        (``ValueError`` naming the first too long one); returns how many would be truncated."""
        if self.limit is None:
            return 0
        lim = PromptLimit(self.limit.limit, self._reserve, self.limit.truncate, self.limit.name)
        encode_prompts(self.lm.tokenizer, questions, "last", self.template, limit=lim)
        return len(lim.truncated)

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
        batch = encode_prompts(lm.tokenizer, questions, self.positions, self.template, lm.device, limit=self.limit)
        B = len(questions)
        results = [QuestionResult() for _ in questions]
        current_rows: List[Optional[torch.Tensor]] = [None]  # row index map of the running pass
        rows_on: Dict[torch.device, torch.Tensor] = {}  # that map on each layer device (a split model)
        rows_of: List[Optional[torch.Tensor]] = [None]  # the map rows_on holds copies of

        def masks_for(layer: int):
            if row_masks is None:
                return None
            m = row_masks(layer)
            if m is None or m.dim() == 1 or current_rows[0] is None:
                return m
            rows = current_rows[0]
            if rows.device != m.device:
                if rows_of[0] is not rows:
                    rows_on.clear()
                    rows_of[0] = rows
                if m.device not in rows_on:
                    rows_on[m.device] = rows.to(m.device)
                rows = rows_on[m.device]
            return m.index_select(0, rows)

        if stats is not None:
            stats.begin(batch)
        # Only the hooks this call needs, each a Python call per layer per pass: the capture
        # for the prompt pass alone (registered first: it sees the unmasked coefficients),
        # the masks for every pass.
        with contextlib.ExitStack() as hooked:
            prompt_only = hooked.enter_context(contextlib.ExitStack())
            if stats is not None:
                prompt_only.enter_context(capture(lm.sites, stats))
            if row_masks is not None:
                hooked.enter_context(mask(lm.sites, masks_for))
            current_rows[0] = torch.arange(B, device=lm.device)
            extra = {}
            if lm.has_lm_head and _accepts(type(lm.model).forward, "logits_to_keep"):
                extra["logits_to_keep"] = 1  # only the last prompt position's logits are used
            out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=lm.has_lm_head, **extra)
            if stats is not None:
                stats.end()
            prompt_only.close()
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
                # A split model's cache lives on every layer's device: index it from the host.
                cache.batch_select_indices(torch.tensor([owners[r] for r in multi]) if lm.split else rows_t)
            # The last token of an option predicts nothing we score: feed tokens 0..L-2.
            attn = torch.cat([batch.attention_mask.index_select(0, rows_t), cmask[:, :-1]], dim=1)
            pos = batch.lengths.index_select(0, rows_t)[:, None] + torch.arange(L - 1, device=lm.device)[None, :]
            current_rows[0] = rows_t
            out = lm.model(input_ids=ids[:, :-1], attention_mask=attn, position_ids=pos, use_cache=True,
                           **{_cache_kwarg(type(lm.model).forward): cache})
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # (M, L-1, V)
            part = (logp.gather(2, ids[:, 1:, None])[..., 0] * cmask[:, 1:]).sum(1)
            rest[torch.tensor(multi, device=lm.device)] = part.double()
        scores = (first + rest).tolist()  # host: every option's score, once per batch
        r = 0
        for b, q in enumerate(questions):
            sc = scores[r : r + n_opts[b]]
            r += n_opts[b]
            res = results[b]
            res.option_logprobs = sc
            res.mcq_pred = pick(sc)
            res.mcq_pred_norm = pick(acc_norm_scores(sc, q.choices))
            res.mcq_correct = res.mcq_pred == q.answer
            res.mcq_norm_correct = res.mcq_pred_norm == q.answer

    def _greedy(self, questions, batch, cache, last_logp, results, current_rows):
        current_rows[0] = torch.arange(len(questions), device=self.lm.device)
        texts = generate(self.lm, batch.attention_mask, batch.lengths, cache, last_logp, self.max_new_tokens,
                         lambda step, logits: logits.argmax(-1))
        for b, q in enumerate(questions):
            results[b].open_text = texts[b]
            results[b].open_correct = open_answer_correct(texts[b], q)


def stop_token_ids(tokenizer) -> set:
    """The tokens that end an open-ended answer: EOS and the newline token."""
    stop_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stop_ids.update(nl[-1:])
    return stop_ids


def generate(lm: LoadedModel, attention_mask: torch.Tensor, lengths: torch.Tensor, cache, first_logits: torch.Tensor,
             max_new_tokens: int, choose: Callable[[int, torch.Tensor], torch.Tensor]) -> List[str]:
    """Open-ended answers continuing left-padded prompts whose key/value ``cache`` is given:
    ``choose(step, logits)`` picks each row's next token from its ``(B, V)`` logits (the
    prompt pass's last position at step 0, ``first_logits``; greedy: the argmax). A row
    stops at EOS or a newline (:func:`stop_token_ids`) or after ``max_new_tokens`` tokens;
    the answer is its decoded tokens' first line, stripped. The step's tokens are read to
    the host once per step. The one decoding loop of the scorer's greedy answers and of
    :func:`specext.probes.sampling.sample_answers`."""
    tok = lm.tokenizer
    B = attention_mask.shape[0]
    stop_ids = stop_token_ids(tok)
    nxt = choose(0, first_logits)  # (B,)
    generated = [[] for _ in range(B)]
    done = [False] * B  # host bookkeeping
    attn = attention_mask
    for step in range(max_new_tokens):
        toks = nxt.tolist()  # host: the step's B tokens, read once per step
        for b in range(B):
            if not done[b]:
                if toks[b] in stop_ids:
                    done[b] = True
                else:
                    generated[b].append(toks[b])
        if all(done) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=attn.device)], dim=1)
        pos = (lengths + step)[:, None]
        out = lm.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                       **{_cache_kwarg(type(lm.model).forward): cache})
        nxt = choose(step + 1, out.logits[:, -1, :])
    return [tok.decode(g, skip_special_tokens=True).split("\n")[0].strip() for g in generated]


def acc_norm_scores(logprobs: Sequence[float], choices: Sequence[str]) -> List[float]:
    """lm-evaluation-harness ``acc_norm`` scores: each option's summed log-likelihood divided
    by the number of characters of its choice text, without the leading space the
    continuation carries (``len(choice)`` in lm-eval's ``process_results``; characters, not
    UTF-8 bytes, so "Zürich" counts 6 and "東京" 2)."""
    if len(logprobs) != len(choices):
        raise ValueError(f"{len(logprobs)} log-likelihoods for {len(choices)} choices")
    out = []
    for lp, ch in zip(logprobs, choices):
        if not ch:
            raise ValueError("acc_norm is undefined for an empty choice")
        out.append(lp / len(ch))
    return out


def pick(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the first (``numpy.argmax``, as lm-eval)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# Leading phrases stripped from the answer span, case-insensitively and repeatedly ("Answer:
# The answer is Paris" -> "Paris"). A phrase counts only when followed by ":", "," or
# whitespace, so "It" in "Italy" or "I" in "Iodine" is never stripped; "A:" needs its colon
# ("A cat" keeps its article). Straight and curly apostrophes both match.
OPEN_PREAMBLES = (
    "answer:", "a:", "the correct answer is", "the answer is", "the answer would be", "the answer should be",
    "my answer is", "i think it is", "i think it's", "i think that it is", "i believe it is", "i believe it's",
    "i think", "i believe", "i guess", "it is", "it's", "it was", "that is", "that's", "this is",
    "probably", "perhaps", "maybe",
)
_PREAMBLE_RE = re.compile(
    r"^(?:" + "|".join(re.escape(p).replace("'", "['\u2019]") for p in sorted(OPEN_PREAMBLES, key=len, reverse=True))
    + r")(?:(?<=:)\s*|\s*[:,]\s*|\s+)",
    flags=re.IGNORECASE,
)
# Where the first clause of an answer span ends: punctuation, a sentence-ending full stop
# (not a decimal point), a bracket or a dash between spaces.
_CLAUSE_END = re.compile(r"[,;:!?()\[\]/]|\.(?=\s|$)|\s[-\u2013\u2014]\s")
_EDGE_PUNCT = " \t\"'`*_.,;:!?()[]{}<>\u2018\u2019\u201c\u201d\u00ab\u00bb"
_LEAD_PUNCT = " \t\"'`*_([{<\u2018\u201c\u00ab"  # markup and quotes before an answer
SHORT_ANSWER_CHARS = 2


def answer_span(text: str) -> str:
    """The part of a generation that is the model's answer: its first non-empty line, with
    leading quotes/markup and preambles (:data:`OPEN_PREAMBLES`, e.g. "The answer is",
    "Answer:", "It's", "I think it is") stripped, case-insensitively and repeatedly."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "").lstrip(_LEAD_PUNCT)
    while True:
        m = _PREAMBLE_RE.match(line)
        rest = line[m.end():].lstrip(_LEAD_PUNCT) if m else ""
        if not rest:  # no preamble, or a preamble with nothing after it
            return line
        line = rest


def _norm(s: str) -> str:
    # Decimal and thousands separators between digits would split a number into words
    # ("3.5" -> "3 5", which starts with "3"): glue them with a word character first.
    return normalize_answer(re.sub(r"(?<=\d)[.,](?=\d)", "_", s))


def open_answer_correct(text: str, q: Question) -> bool:
    """Whether a generation answers ``q``: an accepted answer (the correct choice or an
    alias) in the generation's :func:`answer_span` (its first line, preamble stripped).

    - Answers of more than two characters (after stripping surrounding punctuation): the
      normalised answer (casefolded, accents, punctuation and articles dropped) occurs in the
      normalised span as whole words, and no other choice of the question does (a hedge
      such as "Lyon or Paris" names a distractor too): "Paris", "Paris, France", "It is
      Paris" and "The capital of France is Paris" are accepted for "Paris"; "Parisian",
      "Lyon, not Paris" and "Lyon\nParis" (not on the first line) are not. Base models often
      restate the question before the answer, so the answer need not come first.
    - Answers of one or two characters ("I", "He", "Fe", "Au"): the span's first clause (up
      to , ; : ! ? ( [ / a sentence-ending full stop or a spaced dash), stripped of
      surrounding punctuation, must *equal* the answer, case-sensitively: "He", "He." and "He
      (helium)" are accepted for "He", "he", "He said no" and "I think so" (for "I") are not.
      A whole-word occurrence of a short answer in free text is no evidence: it matches
      pronouns and common words.
    """
    span = answer_span(text)
    if not span:
        return False
    clause = None
    got = None
    for a in q.accepted_answers():
        core = unicodedata.normalize("NFC", a.strip(_EDGE_PUNCT))
        if not core:
            continue
        if len(core) <= SHORT_ANSWER_CHARS:
            if clause is None:
                clause = unicodedata.normalize("NFC", _CLAUSE_END.split(span, maxsplit=1)[0].strip(_EDGE_PUNCT))
            if clause == core:
                return True
            continue
        want = _norm(a)
        got = f" {_norm(span)} " if got is None else got
        if want and f" {want} " in got:
            accepted = {_norm(x) for x in q.accepted_answers()}
            others = [_norm(c) for i, c in enumerate(q.choices) if i != q.answer]
            # a distractor named as well (and not itself one of the accepted names) is a hedge
            if not any(o and o not in accepted and f" {o} " in got and o not in want for o in others):
                return True
    return False


# ---------------------------------------------------------------------------- batching


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA (or other device) out-of-memory error, as torch raises it."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class HalvingBatches:
    """Runs items through a computation in batches, halving the batch on out-of-memory.

    ``run(items, compute, commit)`` calls ``compute(batch)`` on consecutive slices of at
    most ``size`` items; when it raises an out-of-memory error the size is halved (down to
    1, where the error propagates), the device cache emptied, and the same items retried.
    ``commit(batch, result)`` runs only after ``compute`` succeeded, so a retried batch never
    counts twice. The halved size is kept for later calls. The one batching loop of the
    scoring pass and of PSS's masked scoring.
    """

    def __init__(self, size: int, device: torch.device, what: str = "scoring"):
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size, self.device, self.what = size, torch.device(device), what

    def run(self, items: Sequence, compute: Callable, commit: Callable) -> None:
        i = 0
        while i < len(items):
            batch = items[i : i + self.size]
            try:
                result = compute(batch)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not is_out_of_memory(e) or self.size == 1:
                    raise
                self.size = max(1, self.size // 2)
                logger.warning("%s: out of memory at batch size %d; retrying with %d", self.what, len(batch), self.size)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            commit(batch, result)
            i += len(batch)
