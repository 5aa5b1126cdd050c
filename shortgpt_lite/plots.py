"""The seaborn figures the chapters share.

Every figure has a title and labelled axes with units, is readable at the width of a
book page, and is rendered as PNG (nbval does not compare PNGs, and the book stays
small). A chapter calls :func:`book_style` once, then the plotting functions below,
each of which returns its matplotlib ``Axes`` or ``Figure`` so a reader can adjust it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

__all__ = ["adjacent_similarity", "angular_distance_heatmap", "bi_profile", "book_style",
           "similarity_heatmap"]


def book_style() -> None:
    """Seaborn's paper style at a size that reads well in the rendered book, PNG output."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.figsize": (8, 4.5), "figure.dpi": 100, "savefig.dpi": 100,
                         "axes.titleweight": "bold"})
    try:  # inside Jupyter: PNG rather than SVG, which nbval would compare byte by byte
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except ImportError:
        pass


def _numpy(x) -> np.ndarray:
    """A tensor, array or list as a float numpy array (tensors are detached and moved to CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def _axes(ax, figsize):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def similarity_heatmap(matrix, title: str = "Cosine similarity of layer states", *, ax=None,
                       vmin: float | None = None):
    """The (L+1)×(L+1) matrix ``S[i, j] = E_t[cos(x_i, x_j)]`` of :func:`layer_similarity`
    as a heatmap, state ``x_0`` (the embedding output) at the top left."""
    m = _numpy(matrix)
    ax = _axes(ax, (6.5, 5.5))
    tick = max(1, -(-len(m) // 12))  # at most about 12 labels per axis
    sns.heatmap(m, ax=ax, cmap="viridis", vmin=vmin, vmax=1.0, square=True,
                xticklabels=tick, yticklabels=tick,
                cbar_kws={"label": "mean cosine similarity (−1 to 1)"})
    ax.grid(False)
    ax.set_title(title)
    ax.set_xlabel("state $x_j$ (index j: after j decoder layers)")
    ax.set_ylabel("state $x_i$ (index i)")
    return ax


def adjacent_similarity(curves: dict, title: str = "How much one layer turns the residual stream",
                        *, ax=None):
    """``cos(x_i, x_{i+1})`` along depth for several models, ``{name: Tensor[L]}``.

    The x-axis is relative depth ``(i + 0.5) / L``, so models of different depth line up.
    """
    ax = _axes(ax, (8, 4.5))
    for name, values in curves.items():
        v = _numpy(values)
        depth = (np.arange(len(v)) + 0.5) / len(v)
        ax.plot(depth, v, marker="o", markersize=4, label=f"{name} ({len(v)} layers)")
    ax.set_title(title)
    ax.set_xlabel("relative depth of layer i (0 = first, 1 = last)")
    ax.set_ylabel("mean cos($x_i$, $x_{i+1}$)")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    return ax


def bi_profile(scores, title: str = "Block Influence per layer", *, lowest: int = 0, ax=None,
               log: bool = False):
    """Block Influence as one bar per decoder layer; the ``lowest`` layers (the ones ShortGPT
    removes first) are drawn in a second colour."""
    s = _numpy(scores)
    ax = _axes(ax, (8, 4))
    palette = sns.color_palette("colorblind")
    removed = set(np.argsort(s, kind="stable")[:lowest].tolist()) if lowest else set()
    colors = [palette[3] if i in removed else palette[0] for i in range(len(s))]
    ax.bar(np.arange(len(s)), s, color=colors, width=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("decoder layer i")
    ax.set_ylabel("BI = 1 − mean cos($x_i$, $x_{i+1}$)" + (" (log scale)" if log else ""))
    ax.set_xticks(np.arange(0, len(s), max(1, len(s) // 15)))
    ax.set_xlim(-0.6, len(s) - 0.4)
    if removed:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=palette[3], label=f"{lowest} lowest: removed first"),
                           Patch(color=palette[0], label="kept")], loc="upper right")
    return ax


def angular_distance_heatmap(distances, title: str = "Angular distance of n-layer blocks", *,
                             ax=None, mark_min: bool = True):
    """Gromov et al.'s ``d(x_ℓ, x_{ℓ+n})`` as a heatmap: block size ``n`` on the y-axis,
    starting layer ``ℓ`` on the x-axis, the NaN cells past ``ℓ = L-n`` left blank. With
    ``mark_min`` a dot marks, for each ``n``, the block they would remove (the row minimum)."""
    d = _numpy(distances)
    ax = _axes(ax, (8, 5.5))
    n_max, n_layers = d.shape
    sns.heatmap(d, ax=ax, cmap="magma", mask=np.isnan(d), vmin=0,
                xticklabels=max(1, n_layers // 15), yticklabels=max(1, n_max // 12),
                cbar_kws={"label": "angular distance (0 = same direction, 1 = opposite)"})
    ax.set_yticklabels([str(int(t.get_text()) + 1) for t in ax.get_yticklabels()], rotation=0)
    if mark_min:
        for row in range(n_max):
            if not np.isnan(d[row]).all():
                ax.plot(np.nanargmin(d[row]) + 0.5, row + 0.5, "o", color="cyan", markersize=4)
    ax.grid(False)
    ax.set_title(title)
    ax.set_xlabel("first layer of the block ℓ")
    ax.set_ylabel("block size n (layers)")
    return ax
