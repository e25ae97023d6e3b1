"""A permutation null for per-neuron specialisation.

A neuron's Gini over categories is positive even when nothing is specialised: every
category mass is an average of finitely many prompts, so the masses differ by chance. The
null keeps everything but the link between concepts and categories: concepts are randomly
reassigned to categories (each category keeps its number of concepts), the category masses
are recomputed from the concept sums already accumulated, and so are the neurons' Ginis.

Per neuron: ``gini_null`` (the mean over ``P`` permutations) and ``excess_gini = gini -
gini_null``. Whether a neuron is more specialised than its null is decided by a
*studentised, pooled* permutation test, because ``P`` is small (8 by default) and the
empirical 99th percentile of 8 draws is their maximum (exceeded by chance 1 time in 9):

- a neuron's null has ``P + 1`` permuted Ginis ``y_0 .. y_P``. Each null draw is
  standardised against the other ``P`` null draws, ``z_i = (y_i - mean_{j != i} y_j) /
  sd_{j != i} y_j``, and the observed Gini against the first ``P``, ``z_obs = (x -
  mean_{j < P} y_j) / sd_{j < P} y_j``: every standardisation uses ``P`` references, all of
  them null draws;
- the null ``z`` of all live neurons of a layer are pooled, and the neuron is *above its
  null* when its observed ``z`` exceeds the pool's 99th percentile.

So each neuron is compared with its own null's location and spread, the shape of the tail
is estimated from ``(P + 1) x d_ff`` null draws, and the share of truly unspecialised
neurons above is 1 % in expectation whatever ``P`` *and whatever the other neurons do*.
(An earlier version standardised each null draw against the other null draws *and the
observed Gini*: a strongly specialised neuron then inflated its own null draws' reference
spread, the pooled threshold fell, and with many specialised neurons unspecialised ones
crossed it far more often than 1 %: 9 % when 90 % of the neurons carried signal.)
Concepts without a usable prompt at a layer and
categories without one are left out at that layer, as in :func:`specext.metrics.specialization.neuron_table`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from specext.kernels import ops

logger = logging.getLogger(__name__)

NULL_QUANTILE = 0.99


@dataclass
class NullResult:
    """Per-neuron results, each ``(L, d_ff)``, and the per-layer thresholds."""

    gini_null: torch.Tensor  # mean Gini over the permutations (NaN for dead neurons)
    excess_gini: torch.Tensor  # gini - gini_null
    null_z: torch.Tensor  # the observed Gini standardised against its null draws
    above_null: torch.Tensor  # bool: null_z above the layer's pooled 99th percentile
    thresholds: List[float]  # per layer: the pooled 99th percentile of the null z
    permutations: int
    seed: int

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {"gini_null": self.gini_null.contiguous().cpu(), "excess_gini": self.excess_gini.contiguous().cpu(),
                "null_z": self.null_z.contiguous().cpu(), "above_null": self.above_null.to(torch.uint8).contiguous().cpu()}


def permutation_ginis(sums: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, n_categories: int,
                      perms: torch.Tensor) -> torch.Tensor:
    """Ginis of one layer's neurons for each relabelling of its concepts.

    ``sums (K, d_ff)``, ``counts (K,)``: usable concepts' sums and prompt counts at this layer;
    ``labels (K,)`` their categories in ``[0, n_categories)``, every category present;
    ``perms (P, K)``: permutations of ``range(K)``; draw ``p`` gives concept ``k`` the label
    ``labels[perms[p, k]]`` (category sizes kept). Returns ``(P, d_ff)`` float32.
    """
    K, D = sums.shape
    P = perms.shape[0]
    # every draw's category sums at once: a one-hot (P, C, K) assignment times the concept sums,
    # in float64 (each category mass is a sum of whole concepts' sums, exact to float32)
    lab = labels[perms]  # (P, K): draw p gives concept k this category
    onehot = torch.zeros((P, n_categories, K), dtype=torch.float64, device=sums.device)
    onehot.scatter_(1, lab[:, None, :], 1.0)
    cs = onehot @ sums.double()  # (P, C, D)
    cc = onehot @ counts.double()  # (P, C)
    mean = (cs / cc[..., None]).float()  # (P, C, D) category means of each draw
    # one kernel call for all draws: the P draws side by side as P * D neurons
    batched = mean.permute(1, 0, 2).reshape(n_categories, P * D).contiguous()
    return ops.neuron_specialization(batched).gini.view(P, D)


def studentized(observed: torch.Tensor, null: torch.Tensor):
    """Standardisation of the observed Gini and of each null draw against ``P`` null draws.

    ``observed (D,)``, ``null (P + 1, D)``; returns ``(z_observed (D,), z_null (P + 1, D))``:
    null draw ``i`` standardised by the mean and sample sd of the *other* ``P`` null draws, the
    observed one by those of the first ``P`` (so under no signal ``z_observed`` and every
    ``z_null[i]`` have the same distribution, and the observed value never enters a null
    draw's reference set). A draw equal to its references' mean with zero spread gets 0; a
    different one +-inf.
    """
    y = null.double()
    n = y.shape[0] - 1  # size of each reference set
    if n < 2:
        raise ValueError(f"the null needs at least 3 draws (2 references each), got {y.shape[0]}")
    s, q = y.sum(0), (y * y).sum(0)
    m_null = (s[None] - y) / n  # leave-one-out mean and variance among the null draws
    var_null = ((q[None] - y * y) - n * m_null * m_null) / (n - 1)
    m_obs = y[:n].mean(0)
    var_obs = y[:n].var(0, unbiased=True)
    x = torch.cat([observed.double()[None], y], 0)
    m = torch.cat([m_obs[None], m_null], 0)
    var = torch.cat([var_obs[None], var_null], 0).clamp_min(0)
    diff = x - m
    tol = 1e-12 * x.abs().amax(0).clamp_min(1e-30)[None]  # rounding noise of an all-equal set
    z = torch.where(var.sqrt() > tol, diff / var.sqrt(), torch.where(diff.abs() <= tol, torch.zeros_like(diff),
                                                                     diff.sign() * float("inf")))
    return z[0], z[1:]


def permutation_null(sums: torch.Tensor, counts: torch.Tensor, concept_category: Sequence[int], n_categories: int,
                     gini: torch.Tensor, *, permutations: int = 8, seed: int = 0,
                     quantile: float = NULL_QUANTILE) -> NullResult:
    """The concept-permutation null of every neuron's Gini.

    ``sums (K, L, d_ff)`` and ``counts (K, L)``: the concept sums and prompt counts the run
    accumulated; ``gini (L, d_ff)``: the observed Ginis (:func:`specext.metrics.specialization.neuron_table`).
    Per layer, only concepts with a usable prompt take part and only the categories they
    cover. ``permutations`` is ``P``, the size of every reference set; ``P + 1``
    permutations are drawn (see the module's docstring), from
    ``torch.Generator().manual_seed(seed + layer)``, and ``gini_null`` is their mean.
    """
    if permutations < 2:
        raise ValueError(f"--null-permutations must be 0 (off) or >= 2, got {permutations}")
    K, L, D = sums.shape
    dev = sums.device
    cat = torch.as_tensor(list(concept_category), dtype=torch.long)
    gini_null = torch.full((L, D), float("nan"), dtype=torch.float32, device=dev)
    z_obs = torch.full((L, D), float("nan"), dtype=torch.float64, device=dev)
    above = torch.zeros((L, D), dtype=torch.bool, device=dev)
    thresholds: List[float] = []
    counts_cpu = counts.detach().cpu()
    for l in range(L):
        ok = (counts_cpu[:, l] > 0).nonzero().flatten()
        lab = cat[ok]
        present = sorted(set(lab.tolist()))  # host: category labels live on the CPU
        if len(ok) < 2 or len(present) < 2:
            thresholds.append(float("nan"))
            continue
        dense = torch.full((n_categories,), -1, dtype=torch.long)
        dense[present] = torch.arange(len(present))
        g = torch.Generator().manual_seed(seed + l)
        perms = torch.stack([torch.randperm(len(ok), generator=g) for _ in range(permutations + 1)])
        okd = ok.to(dev)
        null = permutation_ginis(sums[okd, l, :], counts[okd, l], dense[lab].to(dev), len(present), perms.to(dev))
        obs = gini[l].to(dev)
        live = torch.isfinite(obs) & torch.isfinite(null).all(0)
        gini_null[l] = torch.where(live, null.mean(0), torch.full_like(obs, float("nan")))
        zo, zn = studentized(torch.where(live, obs, torch.zeros_like(obs)),
                             torch.where(live[None], null, torch.zeros_like(null)))
        pool = zn[:, live].flatten()
        pool = pool[~pool.isnan()]
        if pool.numel() == 0:
            thresholds.append(float("nan"))
            continue
        thr = float(torch.quantile(pool.clamp(-1e300, 1e300).cpu(), quantile))
        thresholds.append(thr)
        z_obs[l] = torch.where(live, zo, torch.full_like(zo, float("nan")))
        above[l] = live & (zo > thr)
    return NullResult(gini_null=gini_null, excess_gini=(gini.to(dev) - gini_null), null_z=z_obs.float(),
                      above_null=above, thresholds=thresholds, permutations=permutations, seed=seed)
