"""Public kernel API: per-neuron category statistics on CPU and CUDA.

Every function takes torch tensors (CPU or CUDA; the work runs on the tensor's current
CUDA stream) or numpy arrays (CPU), never a mix. With torch the kernels are registered
as ``torch.library`` custom ops in the ``specext`` namespace, with fake implementations,
so they work under ``torch.compile`` and ``torch.library.opcheck``::

    from specext import ops
    sums, counts = ops.category_accumulate(acts, labels, num_categories=8)   # acts: (T, N)
    stats = ops.neuron_specialization(sums / counts[:, None])                 # NeuronStats
    norms = ops.value_vector_norms(down_proj.weight)                          # (d_ff,)

The plain-torch equivalents are in :mod:`specext.reference`.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from specext import _ext as _load_native

try:  # torch is optional: the numpy entry points work without it
    import torch
    from torch import Tensor
    from torch.utils.dlpack import to_dlpack as _to_dlpack
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None
    Tensor = Any  # type: ignore[misc,assignment]

STATS = ("abs", "square", "relu", "signed")


class NeuronStats(NamedTuple):
    """Per-neuron specialisation over categories; every field has shape ``(N,)``.

    ``entropy`` in nats, ``norm_entropy`` = entropy / ln C (0 when C == 1), ``gini`` in
    [0, 1 - 1/C], ``top_category`` (int64; -1 for a dead or invalid neuron), ``top_share``
    (mass share of the top category), ``total`` (sum of the neuron's masses). Dead neurons
    (total 0) and invalid ones (a negative, NaN or infinite mass) have NaN in the float
    fields except ``total``.
    """

    entropy: Any
    norm_entropy: Any
    gini: Any
    top_category: Any
    top_share: Any
    total: Any


# ---------------------------------------------------------------------------- plumbing


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _capsule(x):
    """A DLPack capsule of ``x``: numpy arrays versioned where supported (so that read-only
    arrays can be passed without a copy), torch tensors through ``to_dlpack``.

    Torch tensors are exported without any stream synchronisation: the kernels run on the
    tensor's current stream, which is already ordered after its producers. ``__dlpack__()``
    with its default ``stream=None`` would make the legacy default stream wait on an event
    per tensor and call, which is work for nothing and breaks CUDA-graph capture.
    ``to_dlpack`` does what ``__dlpack__(stream=-1)`` does in a tenth of the time (0.2 vs
    2.2 us on CPU; on CUDA ``__dlpack__`` also checks devices and streams in Python)."""
    if _is_torch(x):
        return _to_dlpack(x.detach() if x.requires_grad else x)
    kw = {}
    try:
        return x.__dlpack__(max_version=(1, 0), **kw)
    except TypeError:  # producers older than DLPack 1.0
        return x.__dlpack__(**kw)


_KERNEL_DEVICES = ("cpu", "cuda")


def _eager(*tensors) -> bool:
    """Whether a call may skip torch's dispatcher and go straight to the kernel: plain
    tensors (no subclass such as a FakeTensor, which has no memory to read) on the CPU or
    a CUDA device, outside ``torch.compile`` tracing. The result is the same as through the
    custom op, which costs about 30 us more per call; category_accumulate is called once
    per layer per batch from forward hooks, where that adds up. Under compilation, for
    subclasses and for meta tensors the custom op (with its fake) is used."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) is torch.Tensor and t.device.type in _KERNEL_DEVICES) for t in tensors)


def _device_scope(t):
    """(context manager, stream handle) for running on tensor ``t``'s device."""
    if _is_torch(t) and t.device.type == "cuda":
        return torch.cuda.device(t.device), torch.cuda.current_stream(t.device).cuda_stream
    return contextlib.nullcontext(), 0


def _kind(name: str, x) -> str:
    if _is_torch(x):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _same_kind(**arrays) -> str:
    kinds = {name: _kind(name, x) for name, x in arrays.items() if x is not None}
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"do not mix torch tensors and numpy arrays ({desc})")
    return next(iter(kinds.values()))


def _check_no_grad_outputs(**outputs) -> None:
    """Outputs are written in place by kernels without a gradient: refuse tensors that
    require grad (a leaf would be mutated under autograd's nose; a non-leaf would get a
    gradient that ignores the write)."""
    for name, x in outputs.items():
        if x is not None and _is_torch(x) and x.requires_grad:
            what = "a leaf tensor that requires grad" if x.is_leaf else "a tensor that requires grad"
            raise ValueError(
                f"{name} is {what}, but category_accumulate writes it in place and has no gradient; "
                f"pass a tensor without requires_grad (e.g. torch.zeros(...), or {name}.detach() to "
                f"accumulate into the same memory on purpose)")


def _check_stat(stat: str) -> None:
    if stat not in STATS:
        raise ValueError(f"stat must be one of {', '.join(repr(s) for s in STATS)}; got {stat!r}")


def _dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "")


def _check_real(**arrays) -> None:
    """Refuse complex arrays by their own dtype name: the native binding reads DLPack's type
    code as a float of twice the width, so it would call complex64 "float64"."""
    for name, x in arrays.items():
        if x is None:
            continue
        cplx = x.is_complex() if _is_torch(x) else (isinstance(x, np.ndarray) and np.iscomplexobj(x))
        if cplx:
            raise TypeError(f"{name}: dtype {_dtype_name(x)} is not supported: the kernels take real tensors "
                            f"(float32/float16/bfloat16; pass {name}.real or {name}.abs() if that is what you mean)")


def _native_category_accumulate(acts, labels, weights, sums, counts, stat: str, errors=None) -> None:
    _check_real(acts=acts, labels=labels, weights=weights, sums=sums, counts=counts, errors=errors)
    scope, stream = _device_scope(acts)
    with scope:
        _load_native().category_accumulate(
            _capsule(acts),
            _capsule(labels),
            None if weights is None else _capsule(weights),
            _capsule(sums),
            _capsule(counts),
            stat,
            stream,
            None if errors is None else _capsule(errors),
        )


def _native_neuron_specialization(mass, outs) -> None:
    _check_real(mass=mass)
    scope, stream = _device_scope(mass)
    with scope:
        _load_native().neuron_specialization(_capsule(mass), *[_capsule(o) for o in outs], stream)


def _native_value_vector_norms(weight, out) -> None:
    _check_real(weight=weight)
    scope, stream = _device_scope(weight)
    with scope:
        _load_native().value_vector_norms(_capsule(weight), _capsule(out), stream)


# ---------------------------------------------------------------------------- torch ops

if torch is not None:

    @torch.library.custom_op("specext::category_accumulate_", mutates_args=("sums", "counts"))
    def _category_accumulate_op(
        acts: Tensor, labels: Tensor, weights: Optional[Tensor], sums: Tensor, counts: Tensor, stat: str
    ) -> None:
        _native_category_accumulate(acts, labels, weights, sums, counts, stat)

    @_category_accumulate_op.register_fake
    def _(acts, labels, weights, sums, counts, stat):
        return None

    # The unchecked variant (``category_accumulate(..., errors=)``): its own op, so that the
    # checked op's schema stays as it was and each declares exactly what it mutates.
    @torch.library.custom_op("specext::category_accumulate_unchecked_", mutates_args=("sums", "counts", "errors"))
    def _category_accumulate_unchecked_op(
        acts: Tensor, labels: Tensor, weights: Optional[Tensor], sums: Tensor, counts: Tensor, errors: Tensor, stat: str
    ) -> None:
        _native_category_accumulate(acts, labels, weights, sums, counts, stat, errors)

    @_category_accumulate_unchecked_op.register_fake
    def _(acts, labels, weights, sums, counts, errors, stat):
        return None

    def _functional_op(name: str, schema: str, alloc, native):
        """A custom op that allocates its outputs (``alloc``, also its fake) and fills them."""

        def impl(x):
            out = alloc(x)
            native(x, out)
            return out

        op = torch.library.custom_op(f"specext::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(alloc)
        return op

    _neuron_specialization_op = _functional_op(
        "neuron_specialization", "(Tensor mass) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        lambda mass: _empty_stats_torch(mass), _native_neuron_specialization)
    _value_vector_norms_op = _functional_op(
        "value_vector_norms", "(Tensor weight) -> Tensor", lambda weight: _empty_norms_torch(weight),
        _native_value_vector_norms)


def _empty_norms_torch(weight):
    # A non-2-D weight gets a placeholder; the binding then names the wrong rank.
    return weight.new_empty((weight.shape[1] if weight.dim() == 2 else 0,), dtype=torch.float32)


def _empty_stats_torch(mass):
    n = mass.shape[1] if mass.dim() == 2 else 0
    f = [mass.new_empty((n,), dtype=torch.float32) for _ in range(5)]
    return (f[0], f[1], f[2], mass.new_empty((n,), dtype=torch.int64), f[3], f[4])


# ---------------------------------------------------------------------------- public API


def category_accumulate(
    acts,
    labels,
    num_categories: Optional[int] = None,
    *,
    weights=None,
    stat: str = "abs",
    sums=None,
    counts=None,
    errors=None,
):
    """Accumulate a per-token statistic of every neuron into per-category sums.

    For each token ``t`` with ``labels[t] >= 0``: ``sums[labels[t], n] += w_t * stat(acts[t, n])``
    for every neuron ``n`` and ``counts[labels[t]] += w_t`` (``w_t = weights[t]`` or 1).
    Tokens with a negative label are skipped. Activations are not checked: a NaN or infinite
    one makes its category's sum for that neuron NaN or infinite (the pipeline leaves such
    prompts out before accumulating: ``nonfinite_prompt_layers`` in summary.json). Calling
    it chunk by chunk into the same
    ``sums``/``counts`` gives the same result as one call (bit for bit on CPU; on CUDA the
    token chunks of one call add into an element with atomics in whatever order they finish,
    so two calls may differ in the last bits).

    Args:
        acts: ``(T, N)`` float32/float16/bfloat16, unit stride along N (rows may be strided).
        labels: ``(T,)`` int32/int64 category of each token; ``>= num_categories`` raises
            ``ValueError`` before anything is written (unless ``errors`` is given).
        num_categories: C; needed when ``sums`` is not given.
        weights: optional ``(T,)`` float32 per-token weight.
        stat: ``"abs"`` (|a|), ``"square"`` (a^2), ``"relu"`` (max(a, 0)) or ``"signed"`` (a).
        sums: optional ``(C, N)`` float32 accumulator, updated in place.
        counts: optional ``(C,)`` float32 accumulator, updated in place (``+= w_t``, whatever
            the weight's sign: negative weights subtract). Being float32,
            it counts unit-weight tokens exactly only up to 2**24 (16.7 M) per category;
            the pipeline's counts are prompt weights (about one per prompt), far below.
            ``sums``, ``counts`` and ``errors`` must own their memory: a stride-0 view
            (``expand()``), overlapping elements, memory shared with any other argument
            (compared as byte ranges, so even interleaved views are refused) or a torch
            tensor that requires grad raise ``ValueError`` naming the argument(s). Inputs
            may be broadcast (stride 0): they are only read.
        errors: optional ``(3,)`` int64 error record, zeros to start with, on the device of
            ``acts``; selects the *unchecked* mode for callers that build their labels
            themselves (a forward hook, once per layer): a token whose label is
            ``>= num_categories`` is skipped, never written, and recorded on the device
            instead of raising: ``errors[0]`` += the number of such tokens, ``errors[1]`` /
            ``errors[2]`` = the first such label / its token index, unless an earlier call
            already recorded one. No allocation, copy or host synchronisation on CUDA (the
            checked mode synchronises once per call to raise before writing), so the call
            can be captured in a CUDA graph. Read it once per batch with
            :func:`check_label_errors`.

    Returns:
        ``(sums, counts)``: the accumulators (new float32 zeros when not given).
    """
    kind = _same_kind(acts=acts, labels=labels, weights=weights, sums=sums, counts=counts, errors=errors)
    _check_stat(stat)
    _check_no_grad_outputs(sums=sums, counts=counts, errors=errors)
    if sums is None and num_categories is None:
        raise ValueError("num_categories is required when sums is not given")
    if num_categories is not None:
        if not isinstance(num_categories, (int, np.integer)) or isinstance(num_categories, bool) or num_categories < 1:
            raise ValueError(f"num_categories must be a positive int, got {num_categories!r}")
        if sums is not None and sums.shape[0] != num_categories:
            raise ValueError(f"sums has {sums.shape[0]} rows but num_categories is {num_categories}")
    n_neurons = acts.shape[1] if acts.ndim == 2 else 0
    C = int(num_categories) if num_categories is not None else int(sums.shape[0])
    if kind == "torch":
        if sums is None:
            sums = _new_sums(lambda: torch.zeros((C, n_neurons), dtype=torch.float32, device=acts.device), C, n_neurons)
        if counts is None:
            counts = torch.zeros((C,), dtype=torch.float32, device=sums.device)
        if _eager(acts, labels, weights, sums, counts, errors):
            _native_category_accumulate(acts, labels, weights, sums, counts, stat, errors)
        elif errors is None:
            torch.ops.specext.category_accumulate_(acts, labels, weights, sums, counts, stat)
        else:
            torch.ops.specext.category_accumulate_unchecked_(acts, labels, weights, sums, counts, errors, stat)
    else:
        if sums is None:
            sums = _new_sums(lambda: np.zeros((C, n_neurons), dtype=np.float32), C, n_neurons)
        if counts is None:
            counts = np.zeros((C,), dtype=np.float32)
        _native_category_accumulate(acts, labels, weights, sums, counts, stat, errors)
    return sums, counts


def _new_sums(alloc, C: int, n_neurons: int):
    """The new ``(C, N)`` accumulator, or an error that names ``num_categories`` and the size
    it asked for when the allocator cannot give it (a label count passed as C, say)."""
    try:
        return alloc()
    except (RuntimeError, MemoryError, ValueError) as e:
        gib = C * max(n_neurons, 1) * 4 / 2**30
        raise ValueError(f"num_categories = {C} with {n_neurons} neurons asks for a {C} x {n_neurons} float32 sums "
                         f"accumulator ({gib:.3g} GiB), which could not be allocated ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:240]}); num_categories is the number of categories, not of "
                         "tokens or labels") from None


def _accumulate_unchecked(acts, labels, weights, sums, counts, errors, stat: str) -> None:
    """Internal: ``category_accumulate(acts, labels, weights=, stat=, sums=, counts=,
    errors=)`` for a caller that built every argument itself (:class:`PromptStats`'s forward
    hooks: torch tensors, a valid ``stat``, real floating activations, outputs without
    grad). It skips the public function's Python checks (35 -> 30 us per call at a hook's
    240 x 512, warm; once per layer per batch); the native binding still checks
    shapes, dtypes, devices and aliasing and raises as before. Under ``torch.compile``, for
    tensor subclasses and for meta tensors it is the public function."""
    if _eager(acts, labels, weights, sums, counts, errors):
        _native_category_accumulate(acts, labels, weights, sums, counts, stat, errors)
    else:
        category_accumulate(acts, labels, weights=weights, stat=stat, sums=sums, counts=counts, errors=errors)


def check_label_errors(errors, num_categories: int, *, row_name: str = "row") -> None:
    """Raise ``ValueError`` if an error record of :func:`category_accumulate` holds a bad label.

    Args:
        errors: ``(3,)`` int64 record of one series of calls, or ``(R, 3)``, one record per
            row (e.g. per layer); torch tensor (any device) or numpy array.
        num_categories: the C the calls accumulated into, for the message.
        row_name: what a row of a 2-D record is, for the message (``"layer"``).

    Reads ``errors`` once (on CUDA one copy to the host, i.e. one synchronisation): call it
    once per batch, after the calls, not after each call. The message names the first bad
    label, its token index and (2-D) its row, and the number of tokens that were skipped.
    """
    if errors.ndim not in (1, 2) or errors.shape[-1] != 3:
        raise ValueError(f"errors must have shape (3,) or (rows, 3), got {tuple(errors.shape)}")
    rows = errors.tolist()  # host: the one read of the record (a sync on CUDA), once per batch
    rows = [rows] if errors.ndim == 1 else rows
    bad = [i for i, r in enumerate(rows) if r[0] > 0]
    if not bad:
        return
    _, label, token = rows[bad[0]]
    where = f"{row_name} {bad[0]}: " if errors.ndim == 2 else ""
    total = sum(rows[i][0] for i in bad)
    at = f" (at {row_name}(s) {', '.join(map(str, bad))})" if errors.ndim == 2 else ""
    raise ValueError(
        f"{where}labels[{token}] = {label} is out of range for num_categories = {num_categories} "
        f"(labels must be < num_categories; negative labels skip the token); {total} such token(s){at} "
        f"were skipped, nothing was written for them")


def neuron_specialization(mass) -> NeuronStats:
    """Per-neuron specialisation over categories from a ``(C, N)`` float32 mass matrix.

    With ``p = mass[:, n] / sum_c mass[c, n]``: ``entropy = -sum p ln p`` (nats),
    ``norm_entropy = entropy / ln C``, ``gini = sum_i (2i - C - 1) x_(i) / (C sum x)`` over
    the ascending masses (uniform 0, one-hot 1 - 1/C), ``top_category`` (first argmax),
    ``top_share``, ``total``. See :class:`NeuronStats` for dead and invalid neurons.
    Mass must be non-negative (e.g. from ``stat="abs"``).
    """
    kind = _kind("mass", mass)
    if kind == "torch":
        return NeuronStats(*torch.ops.specext.neuron_specialization(mass))
    n = mass.shape[1] if mass.ndim == 2 else 0
    outs = [np.empty((n,), np.float32) for _ in range(3)] + [np.empty((n,), np.int64)]
    outs += [np.empty((n,), np.float32) for _ in range(2)]
    _native_neuron_specialization(mass, outs)
    return NeuronStats(*outs)


def value_vector_norms(weight):
    """L2 norm of every column (value vector) of a down-projection weight.

    Args:
        weight: ``(d_model, d_ff)`` float32/float16/bfloat16/float64, any strides (a
            transposed view, as GPT-2's Conv1D gives, is read in place).

    Returns:
        ``(d_ff,)`` float32 norms, accumulated in float64.
    """
    if _kind("weight", weight) == "torch":
        return torch.ops.specext.value_vector_norms(weight)
    out = np.empty((weight.shape[1] if weight.ndim == 2 else 0,), np.float32)
    _native_value_vector_norms(weight, out)
    return out


__all__ = ["STATS", "NeuronStats", "category_accumulate", "check_label_errors", "neuron_specialization",
           "value_vector_norms"]
