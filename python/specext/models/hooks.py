"""Forward pre-hooks on the MLP down-projections: read the coefficients as they stream
out of a forward pass (:func:`capture`) or zero chosen ones (:func:`mask`).

The *coefficients* of layer ``l`` are the input of its down-projection, ``(batch, seq,
d_ff)``; hooks never store them.

Devices: a hook runs where its layer computes. For a model split by a device map
(accelerate), a layer's down-projection input is on that layer's execution device
(:attr:`specext.models.loading.LoadedModel.layer_devices`): the sink receives it there, and
a mask should already be there (placed once per batch by the caller); one on another device
is moved, correct but a copy per forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch

from specext.models.loading import MlpSite


@contextlib.contextmanager
def capture(sites: Sequence[MlpSite], sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward pass calls ``sink(layer, coefficients)`` with the input of
    each layer's down-projection, ``(batch, seq, d_ff)``, before the projection runs. The
    sink must not modify the tensor (it is the model's own activation) and should reduce it
    at once: nothing is stored here."""
    handles = []
    try:
        for s in sites:
            def hook(module, args, layer=s.layer):
                sink(layer, args[0])
            handles.append(s.module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def mask(sites: Sequence[MlpSite], masks: Callable[[int], Optional[torch.Tensor]]) -> Iterator[None]:
    """Zero chosen coefficients during forward passes. ``masks(layer)`` returns ``None``
    (leave the layer alone) or a ``(batch, d_ff)`` multiplier (0 = masked, 1 = kept; one
    row per batch row, so every row can have its own mask) or a ``(d_ff,)`` one for all rows."""
    handles = []
    try:
        for s in sites:
            def hook(module, args, layer=s.layer):
                m = masks(layer)
                if m is None:
                    return None
                x = args[0]
                mm = m.to(device=x.device, dtype=x.dtype)
                mm = mm[:, None, :] if mm.dim() == 2 else mm
                return (x * mm,) + tuple(args[1:])
            handles.append(s.module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
