"""Trainable deltas on chosen value vectors (columns of the MLP down-projections).

The causal fine-tuning experiments (:mod:`specext.pipelines.finetune`) train only selected
value vectors. :class:`ColumnDeltas` holds one dense delta ``(d_model, k_l)`` per layer for
the ``k_l`` selected columns of that layer's down-projection ``W (d_model, d_ff)`` and,
while :meth:`ColumnDeltas.attached`, adds it in the forward pass::

    y = W x + b + delta @ x[idx]          ==  (W with W[:, idx] += delta) x + b

by a forward hook on the down-projection: the stored weight is never modified during
training, the optimizer sees only the deltas (its state grows with the selection, not with
the model), and no ``(d_model, d_ff)`` scattered copy of the weight is built per forward
pass (a selection of every column adds ``delta @ x`` without the gather). GPT-2's Conv1D
stores the weight transposed ``(d_ff, d_model)``: its column ``i`` is the weight's row
``i``; the hook works on the module's output and is the same for both layouts.

:meth:`ColumnDeltas.merge_` writes ``W[:, idx] += delta`` into the weights at the end (in
float32, rounded once to the weight's dtype); :meth:`snapshot` / :meth:`restore` keep and
put back the selected columns' original values exactly, so one loaded model serves several
fine-tuning runs.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from specext.models.loading import MlpSite


class ColumnDeltas:
    """Dense deltas on the selected columns of each layer's down-projection.

    ``selected``: ``(L, d_ff)`` bool, ``selected[l, i]`` = value vector ``(l, i)`` is trained.
    Each layer's delta is a float32 (``dtype``) parameter ``(d_model, k_l)`` of zeros on the
    device of that layer's weight (for a model split over devices, where the layer runs);
    layers with nothing selected get none. ``index[l]`` holds the selected columns
    (ascending, int64, same device)."""

    def __init__(self, sites: Sequence[MlpSite], selected: torch.Tensor, dtype: torch.dtype = torch.float32):
        if selected.dtype != torch.bool or selected.dim() != 2:
            raise ValueError(f"selected must be a (layers, d_ff) bool tensor, got {tuple(selected.shape)} "
                             f"{selected.dtype}")
        L, D = len(sites), (sites[0].d_ff if sites else 0)
        if tuple(selected.shape) != (L, D):
            raise ValueError(f"selected has shape {tuple(selected.shape)} but the model has {L} layers of d_ff {D}")
        self.sites = list(sites)
        self.selected = selected.detach().cpu()
        self.index: List[Optional[torch.Tensor]] = []
        self.deltas: List[Optional[nn.Parameter]] = []
        self.full: List[bool] = []
        for s, row in zip(self.sites, self.selected):
            w = s.module.weight
            if w.is_meta:
                raise ValueError(f"{s.name}: the weight is offloaded (a meta tensor); fine-tuning needs every "
                                 "down-projection in memory (give --max-memory enough room, no disk offload)")
            idx = row.nonzero()[:, 0]
            if idx.numel() == 0:
                self.index.append(None)
                self.deltas.append(None)
                self.full.append(False)
                continue
            self.index.append(idx.to(w.device))
            self.deltas.append(nn.Parameter(torch.zeros((s.d_model, idx.numel()), dtype=dtype, device=w.device)))
            self.full.append(idx.numel() == s.d_ff)

    # ------------------------------------------------------------------ parameters

    def parameters(self) -> List[nn.Parameter]:
        """The trainable deltas (layers with a selection only), in layer order."""
        return [d for d in self.deltas if d is not None]

    @property
    def n_selected(self) -> int:
        return int(self.selected.sum())

    def numel(self) -> int:
        return sum(d.numel() for d in self.parameters())

    # ------------------------------------------------------------------ forward

    @contextlib.contextmanager
    def attached(self) -> Iterator["ColumnDeltas"]:
        """While active, each layer's down-projection output gets ``delta @ x[..., idx]``."""
        handles = []
        try:
            for s, idx, delta, full in zip(self.sites, self.index, self.deltas, self.full):
                if delta is None:
                    continue

                def hook(module, args, output, idx=idx, delta=delta, full=full):
                    x = args[0]
                    xs = x if full else x.index_select(-1, idx)
                    return output + nn.functional.linear(xs, delta.to(xs.dtype))

                handles.append(s.module.register_forward_hook(hook))
            yield self
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ weights

    def _columns(self, s: MlpSite, idx: torch.Tensor) -> torch.Tensor:
        """The selected columns as ``(d_model, k)`` (a copy)."""
        w = s.module.weight
        return w[idx, :].t() if s.conv1d else w[:, idx]

    def _write(self, s: MlpSite, idx: torch.Tensor, cols: torch.Tensor) -> None:
        w = s.module.weight
        if s.conv1d:
            w[idx, :] = cols.t().to(w.dtype)
        else:
            w[:, idx] = cols.to(w.dtype)

    @torch.no_grad()
    def snapshot(self) -> List[Optional[torch.Tensor]]:
        """A copy of the selected columns' current values (for :meth:`restore`)."""
        return [None if idx is None else self._columns(s, idx).clone() for s, idx in zip(self.sites, self.index)]

    @torch.no_grad()
    def restore(self, snap: Sequence[Optional[torch.Tensor]]) -> None:
        """Put back the values of :meth:`snapshot`, bit for bit."""
        for s, idx, cols in zip(self.sites, self.index, snap):
            if idx is not None:
                self._write(s, idx, cols)

    @torch.no_grad()
    def merge_(self) -> None:
        """``W[:, idx] += delta`` in every layer (computed in float32, rounded once to the
        weight's dtype); nothing else in the weights changes."""
        for s, idx, delta in zip(self.sites, self.index, self.deltas):
            if delta is not None:
                cols = self._columns(s, idx).float() + delta.detach().float()
                self._write(s, idx, cols)

    def state(self) -> Dict[str, torch.Tensor]:
        """``index.L`` (int64 columns) and ``delta.L`` (``(d_model, k_l)``) per layer with a
        selection, on the CPU (for ``delta.safetensors``)."""
        out = {}
        for s, idx, delta in zip(self.sites, self.index, self.deltas):
            if delta is not None:
                out[f"index.{s.layer}"] = idx.cpu()
                out[f"delta.{s.layer}"] = delta.detach().cpu()
        return out
