"""The report's figures: one PNG per function, written atomically (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from specext.pipelines import rundir

logger = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    rundir.write_bytes(path, buf.getvalue())
    _plt().close(fig)


def _label(text) -> str:
    """A probe's own text (a category, a tier) as a plot label: a ``$`` would start
    matplotlib's math mode (``cost $\\frac{a$`` crashed the report), so it is escaped."""
    return str(text).replace("$", r"\$")


def upper_outliers(v: np.ndarray) -> int:
    """How many values lie above the upper whisker (Q3 + 1.5 IQR), as the box plot draws them."""
    q1, q3 = np.percentile(v, [25, 75])
    return int((v > q3 + 1.5 * (q3 - q1)).sum())


def plot_gini_by_layer(gini: torch.Tensor, path: Path) -> None:
    plt = _plt()
    L = gini.shape[0]
    data = [g[~torch.isnan(g)].cpu().numpy() for g in gini]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * L + 2), 3.6))
    # The outliers above the whiskers are the most specialised neurons: drawn, small and
    # translucent so that thousands of them per layer (a 70B model) stay readable.
    ax.boxplot([d if len(d) else [np.nan] for d in data], positions=range(L), widths=0.6, showfliers=True,
               flierprops=dict(marker="o", markersize=3, markerfacecolor="C0", markeredgecolor="none", alpha=0.5))
    ax.plot(range(L), [d.mean() if len(d) else np.nan for d in data], "o-", color="C3", ms=3, label="mean")
    n_out = sum(upper_outliers(d) for d in data if len(d))
    ax.set_xlabel("layer")
    ax.set_ylabel("Gini over categories")
    ax.set_title(f"Per-neuron Gini by layer (boxes: quartiles, whiskers 1.5 IQR;\n"
                 f"points: {n_out:,} neuron{'' if n_out == 1 else 's'} above the upper whisker)", fontsize=10)
    ax.set_xticks(range(0, L, max(1, L // 16)))
    ax.legend(loc="upper left")
    _save(fig, path)


def plot_norm_entropy(norm_entropy: torch.Tensor, path: Path) -> None:
    plt = _plt()
    v = norm_entropy[~torch.isnan(norm_entropy)].cpu().numpy().ravel()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(v, bins=60, range=(0, 1), color="C0")
    ax.set_yscale("log")
    ax.set_xlabel("normalised entropy (1 = spread evenly over categories)")
    ax.set_ylabel("neurons")
    ax.set_title(f"Normalised category entropy of {len(v):,} live neurons")
    _save(fig, path)


def plot_layer_category(cat_mass: torch.Tensor, categories: List[str], path: Path) -> None:
    """Each layer's mass split over categories, coloured by the departure from the uniform
    share 1/C (white), red above and blue below it, on a scale of at least +-25% of 1/C so that
    near-uniform layers look near-uniform; the numbers in the cells in black or white,
    whichever reads on the cell's colour."""
    from matplotlib.colors import CenteredNorm

    plt = _plt()
    m = torch.nan_to_num(cat_mass.double(), nan=0.0).sum(-1)  # (C, L)
    share = (m / m.sum(0, keepdim=True).clamp_min(1e-300)).T.cpu().numpy()  # (L, C)
    L, C = share.shape
    uniform = 1.0 / C
    half = max(float(np.abs(share - uniform).max()) if share.size else 0.0, 0.25 * uniform)
    norm = CenteredNorm(vcenter=uniform, halfrange=half)
    cmap = plt.get_cmap("RdBu_r")
    fig, ax = plt.subplots(figsize=(max(5, 0.75 * C + 2.5), max(3, 0.26 * L + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(C))
    ax.set_xticklabels([_label(c) for c in categories], rotation=45, ha="right")
    ax.set_yticks(range(0, L, max(1, L // 16)))
    ax.set_xlabel("category")
    ax.set_ylabel("layer")
    ax.set_title(f"Share of each layer's MLP mass by category (uniform 1/{C} = {uniform:.3f})", fontsize=10)
    if L * C <= 160:  # small enough to print the numbers
        for i in range(L):
            for j in range(C):
                r, g, b, _ = cmap(norm(share[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{share[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.04)
    cb.set_label("share (white: uniform)", fontsize=8)
    _save(fig, path)


TIER_ORDER = ("high", "medium", "low")


def ordered(labels) -> List[str]:
    """Frequency tiers high, medium, low (then any other, in their order); other labels as given."""
    labels = list(labels)
    if not any(l in TIER_ORDER for l in labels):
        return labels
    return [t for t in TIER_ORDER if t in labels] + [l for l in labels if l not in TIER_ORDER]


def plot_accuracy(summary: Dict, path: Path) -> None:
    plt = _plt()
    groups = [("category", summary.get("accuracy_by_category", {})), ("tier", summary.get("accuracy_by_tier", {}))]
    groups = [(n, g) for n, g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.4), squeeze=False)
    for ax, (name, g) in zip(axes[0], groups):
        labels = ordered(g) if name == "tier" else list(g)
        x = np.arange(len(labels))
        for j, key in enumerate(("mcq", "mcq_norm", "open")):
            vals = [g[l].get(key) for l in labels]
            vals = [np.nan if v is None else v for v in vals]
            ax.bar(x + (j - 1) * 0.27, vals, width=0.27, label=key)
        ax.set_xticks(x)
        ax.set_xticklabels([_label(l) for l in labels], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"accuracy by {name}")
    # one legend, right of the last panel: clear of the bars (which reach 1.0)
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       fontsize=8, frameon=False)
    _save(fig, path)


def _band(ax, x, ci, color):
    if not ci or all(c is None for c in ci):
        return
    lo = [np.nan if c is None else c[0] for c in ci]
    hi = [np.nan if c is None else c[1] for c in ci]
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)


def plot_pss_curve(pss: Dict, path: Path) -> None:
    """Both scores side by side: the paper's (with its floor at ratio 0) and the
    baseline-corrected delta, each against the random-vector control, with 95% bands."""
    plt = _plt()
    r = pss["ratios"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
    for ax, sc in zip(axes, ("paper", "delta")):
        b = pss.get(sc) or {}
        if not b:
            ax.set_visible(False)
            continue
        head = " (headline)" if pss.get("score") == sc else ""
        ax.plot(r, b["curve"], "o-", color="C0", label="top differential vectors")
        _band(ax, r, b.get("curve_ci"), "C0")
        if b.get("random_curve"):
            ax.plot(r, b["random_curve"], "s--", color="gray", label="random vectors (control)")
            _band(ax, r, b.get("random_curve_ci"), "gray")
        if sc == "paper" and pss.get("floor") is not None:
            x0 = min(r) / 3
            ax.errorbar([x0], [pss["floor"]], yerr=_yerr(pss["floor"], pss.get("floor_ci")), fmt="D", color="C3",
                        capsize=3, label="floor: no mask (ratio 0)")
            ax.axhline(pss["floor"], color="C3", lw=0.8, ls=":")
        ax.set_xscale("log")
        ticks = ([min(r) / 3] if sc == "paper" else []) + list(r)
        ax.set_xticks(ticks)
        ax.set_xticklabels((["0"] if sc == "paper" else []) + [f"{x:g}" for x in r])
        ax.minorticks_off()  # a log axis' own minor labels (4x10^0, 6x10^0) beside ours
        ax.set_xlabel("masked value vectors (% of all)")
        ax.set_ylabel("PSS" if sc == "paper" else "PSS delta")
        pk = b.get("peak")
        pci = b.get("peak_ci")
        pk_s = "n/a" if pk is None or pk != pk else f"{pk:.3f}" + (f" [{pci[0]:.3f}, {pci[1]:.3f}]" if pci else "")
        ax.set_title(("paper: |G - CS| / A" if sc == "paper" else "delta: |dG - dCS| / A") + head
                     + f"\npeak {pk_s}", fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=7)
    bands = "bands: 95% bootstrap" if pss.get("bootstrap") else "no intervals: --bootstrap 0"
    fig.suptitle(f"PSS vs masking ratio, mean over {pss['concepts']} concepts ({bands})", fontsize=10, y=1.06)
    _save(fig, path)


def _yerr(v, ci):
    if not ci:
        return None
    return [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]


def plot_gini_null(summary: Dict, path: Path) -> None:
    """Per-layer mean Gini next to its permutation null and, when run, the random twin's."""
    plt = _plt()
    layers = summary["layers"]
    x = [l["layer"] for l in layers]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ax = axes[0]
    ax.plot(x, [l["mean_gini"] for l in layers], "o-", color="C0", label="model")
    ax.plot(x, [l.get("mean_gini_null") for l in layers], "s--", color="gray", label="null: categories permuted")
    tw = summary.get("random_twin")
    if tw:
        ax.plot(x, [l.get("mean_gini") for l in tw["layers"]], "^-", color="C2", label="random-init twin")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean Gini over live neurons")
    ax.set_title("Specialisation against its controls")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.bar(x, [l.get("share_above_null") for l in layers], color="C0", label="model")
    if tw:
        ax.plot(x, [l.get("share_above_null") for l in tw["layers"]], "^-", color="C2", label="random-init twin")
    ax.axhline(0.01, color="C3", ls=":", label="1%: expected by chance")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of neurons")
    ax.set_title("Neurons above their null's 99th percentile")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # clear of the bars
    for a in axes:
        a.set_xticks(range(0, len(x), max(1, len(x) // 16)))
    _save(fig, path)


def plot_pss_groups(pss: Dict, path: Path) -> None:
    plt = _plt()
    groups = [(g, pss.get(f"by_{g}", {})) for g in ("tier", "category")]
    groups = [(n, g) for n, g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.4), squeeze=False)
    r = pss["ratios"]
    for ax, (name, g) in zip(axes[0], groups):
        for label in (ordered(g) if name == "tier" else list(g)):
            v = g[label]
            ax.plot(r, v["curve"], "o-", ms=3, label=f"{_label(label)} ({v['concepts']})")
        ax.set_xscale("log")
        ax.set_xticks(r)
        ax.set_xticklabels([f"{x:g}" for x in r])
        ax.minorticks_off()
        ax.set_xlabel("masked vectors (%)")
        ax.set_ylabel("PSS (paper)" if pss.get("score", "paper") == "paper" else "PSS delta")
        ax.set_title(f"PSS by {name}")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_pss_layers(layer_counts: Dict, path: Path) -> None:
    plt = _plt()
    ratios = sorted(layer_counts, key=float)
    L = len(next(iter(layer_counts.values())))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for r in ratios:
        c = np.asarray(layer_counts[r], dtype=float)
        ax.plot(range(L), c / max(c.sum(), 1e-12), "o-", ms=3, label=f"{float(r):g}%")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of selected vectors")
    ax.set_title("Where the masked (top differential) vectors sit")
    ax.set_xticks(range(0, L, max(1, L // 16)))
    ax.legend(fontsize=7, title="ratio")
    _save(fig, path)
