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
from matplotlib.ticker import FuncFormatter

__all__ = ["accuracy_dots", "adjacent_similarity", "angular_distance_heatmap", "bi_profile",
           "book_style", "healing_curves", "pareto_plot", "removal_overview", "similarity_heatmap", "removal_curves",
           "speedup_plot"]


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
    """Block Influence per decoder layer, the ``lowest`` layers (the ones ShortGPT removes
    first) in a second colour: bars on a linear axis, dots on a log axis (``log=True``),
    where a bar's length would depend on the arbitrary bottom of the axis."""
    s = _numpy(scores)
    ax = _axes(ax, (8, 4))
    palette = sns.color_palette("colorblind")
    removed = set(np.argsort(s, kind="stable")[:lowest].tolist()) if lowest else set()
    colors = [palette[3] if i in removed else palette[0] for i in range(len(s))]
    if log:
        ax.plot(np.arange(len(s)), s, color="lightgray", linewidth=1, zorder=1)
        ax.scatter(np.arange(len(s)), s, c=colors, s=36, zorder=2)
        ax.set_yscale("log")
    else:
        ax.bar(np.arange(len(s)), s, color=colors, width=0.8)
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


_CURVE_LABELS = {"ppl": "perplexity (lower is better)", "acc": "accuracy (share of items)",
                 "acc_norm": "acc_norm (share of items)"}


def removal_curves(df, y: str = "ppl", title: str | None = None, *, hue: str = "metric",
                   ax=None, logy: bool | None = None, band: bool = True):
    """``y`` against the number of removed layers ``k``, one line per ``hue`` value, from the
    DataFrame of :func:`shortgpt_lite.experiments.removal_curve` (several concatenated).

    With ``band`` the interval columns ``{y}_ci_low`` .. ``{y}_ci_high`` are shaded: the
    Wilson interval for accuracies, the bootstrap over windows for perplexity. A dashed
    line marks chance for accuracies (column ``chance``). Perplexity goes on a log axis
    by default, since removing the wrong layer multiplies it.
    """
    if y not in df.columns:
        raise ValueError(f"The frame has no column {y!r}; it has {', '.join(map(str, df.columns))}.")
    ax = _axes(ax, (8, 4.8))
    groups = list(dict.fromkeys(df[hue])) if hue in df.columns else [None]
    palette = sns.color_palette("colorblind", max(len(groups), 1))
    markers = "osD^vP*Xph"
    for i, name in enumerate(groups):
        part = df if name is None else df[df[hue] == name]
        part = part.sort_values("k")
        ax.plot(part["k"], part[y], marker=markers[i % len(markers)], color=palette[i],
                label=str(name), linewidth=1.8, markersize=5)
        low, high = f"{y}_ci_low", f"{y}_ci_high"
        if band and low in part.columns and high in part.columns:
            ax.fill_between(part["k"], part[low], part[high], color=palette[i], alpha=0.12,
                            linewidth=0)
    if y.startswith("acc") and "chance" in df.columns:
        ax.axhline(float(df["chance"].mean()), color="gray", linestyle="--", linewidth=1,
                   label="chance")
    if logy if logy is not None else y == "ppl":
        ax.set_yscale("log")
    label = _CURVE_LABELS.get(y, y)
    if y == "ppl" and "seq_len" in df.columns:
        label = f"perplexity at {int(df['seq_len'].iloc[0])} tokens (log scale)"
    ax.set_ylabel(label)
    ax.set_xlabel("decoder layers removed, k")
    ax.set_xticks(sorted(set(int(k) for k in df["k"])))
    ax.set_title(title or f"{_CURVE_LABELS.get(y, y).split(' (')[0].capitalize()} "
                          "as layers are removed")
    ax.legend(title=hue if hue in df.columns else None, fontsize="small", ncol=2)
    return ax


def speedup_plot(df, num_layers: int, title: str = "Measured speed-up against the ideal", *,
                 ax=None):
    """Measured ratios against the ideal ``L / (L - k)``.

    ``df`` has one row per ``k`` (column ``k``, one row with ``k = 0``) and the columns of
    :func:`shortgpt_lite.costs.cost`: ``prefill_seconds``, ``decode_tokens_per_s``,
    ``peak_memory_bytes``. Plotted relative to ``k = 0``: prefill speed-up
    ``t_0 / t_k``, decode speed-up ``r_k / r_0`` and memory reduction ``m_0 / m_k``.
    Only the decoder blocks shrink, so the embedding and head keep every ratio below the
    ideal line.
    """
    import numpy as np

    d = df.sort_values("k")
    base = d[d["k"] == 0]
    if base.empty:
        raise ValueError("speedup_plot needs a row with k = 0 (the unpruned model) as reference.")
    base = base.iloc[0]
    k = d["k"].to_numpy(dtype=float)
    ax = _axes(ax, (8, 4.5))
    palette = sns.color_palette("colorblind", 4)
    ks = np.linspace(0, k.max(), 50)
    ax.plot(ks, num_layers / (num_layers - ks), color="gray", linestyle="--",
            label=f"ideal L/(L−k), L = {num_layers}")
    series = [("prefill speed-up", base["prefill_seconds"] / d["prefill_seconds"], "o"),
              ("decode speed-up", d["decode_tokens_per_s"] / base["decode_tokens_per_s"], "s"),
              ("peak-memory reduction", base["peak_memory_bytes"] / d["peak_memory_bytes"], "D")]
    for i, (label, ratio, marker) in enumerate(series):
        ax.plot(k, ratio, marker=marker, color=palette[i], label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("decoder layers removed, k")
    ax.set_ylabel("ratio to the unpruned model (×)")
    ax.set_xticks(sorted(set(int(x) for x in k)))
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def _random_band(ax, part, color, label):
    """Median of the random seeds as a line, their range as a band."""
    wide = part.pivot(index="k", columns="ordering", values="ppl")
    ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color=color, alpha=0.18,
                    linewidth=0)
    ax.plot(wide.index, wide.median(axis=1), color=color, linestyle="--", marker="x",
            label=f"{label} (median and range of {wide.shape[1]} seeds)")


def removal_overview(curves, title: str, *, data_free=("sequential", "reverse", "random"),
                     off_scale: float = 10.0):
    """Two panels from :func:`shortgpt_lite.curves.curve_table`: every ordering on a log
    axis (random seeds as a median line and a range band), and the data-driven metrics
    alone on a linear axis with their 95% bootstrap bands over windows, where their
    differences can be seen. A data-driven metric whose worst perplexity is more than
    ``off_scale`` times the others' best worst would flatten that axis; it is left out of
    the linear panel and named in its title (the log panel shows it)."""
    families = list(dict.fromkeys(curves["family"]))
    worst = curves.groupby("family")["ppl"].max()
    driven = [f for f in families if f not in data_free]
    limit = off_scale * worst[driven].min() if driven else float("inf")
    dropped = [f for f in driven if worst[f] > limit]
    palette = dict(zip(families, sns.color_palette("colorblind", len(families))))
    markers = dict(zip(families, "osD^vP*Xph"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 1.15]})
    for ax, free in zip(axes, (True, False)):
        for fam in families:
            if not free and (fam in data_free or fam in dropped):
                continue
            part = curves[curves["family"] == fam].sort_values("k")
            if fam == "random":
                _random_band(ax, part, palette[fam], fam)
                continue
            ax.plot(part["k"], part["ppl"], marker=markers[fam], color=palette[fam], label=fam,
                    linewidth=1.8, markersize=5)
            if not free:
                ax.fill_between(part["k"], part["ppl_ci_low"], part["ppl_ci_high"],
                                color=palette[fam], alpha=0.15, linewidth=0)
        ax.set_xlabel("decoder layers removed, k")
        ax.set_xticks(sorted(set(int(k) for k in curves["k"])))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].set_title("All orderings")
    axes[1].set_ylabel("perplexity (linear scale)")
    axes[1].set_title("Data-driven metrics, 95% bands over windows"
                      + (f"\n(off this scale: {', '.join(dropped)})" if dropped else ""))
    for ax in axes:
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def accuracy_dots(acc, title: str, *, chance: float | None = None):
    """Dot-and-whisker accuracy per ordering (rows), one colour per ``k``, from
    :func:`shortgpt_lite.curves.accuracy_table`: the 95% Wilson interval as the whisker."""
    acc = acc[~acc["ordering"].str.contains(":")]
    ks = sorted(acc["k"].unique())
    order = list(dict.fromkeys(acc.sort_values("acc", ascending=False)["ordering"]))
    palette = dict(zip(ks, sns.color_palette("colorblind", len(ks))))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(order) + 1.6))
    offsets = np.linspace(-0.25, 0.25, len(ks)) if len(ks) > 1 else [0.0]
    for off, k in zip(offsets, ks):
        part = acc[acc["k"] == k].set_index("ordering").reindex(order).dropna(subset=["acc"])
        y = np.array([order.index(o) for o in part.index]) + off
        ax.errorbar(part["acc"], y, xerr=[part["acc"] - part["acc_ci_low"],
                                         part["acc_ci_high"] - part["acc"]],
                    fmt="o", color=palette[k], capsize=3, label=f"k = {k}")
    if chance is not None:
        ax.axvline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy, pooled over the items (95% Wilson interval)")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=len(ks) + (chance is not None))
    fig.tight_layout()
    return fig


def pareto_plot(table, costs: dict, qualities: dict, title: str, *, label: str = "method"):
    """Quality against cost, one panel per (quality, cost) pair: a row of panels per entry
    of ``qualities`` (``column: (axis label, low column, high column, higher_is_better)``),
    a column per entry of ``costs`` (``column: axis label``, lower is cheaper). Every row
    of ``table`` is a point with its interval, named by its ``label`` column; the line joins
    the points no other point beats on both axes (the Pareto front)."""
    names = list(table[label])
    palette = dict(zip(names, sns.color_palette("colorblind", len(names))))
    fig, axes = plt.subplots(len(qualities), len(costs), squeeze=False,
                             figsize=(4.2 * len(costs), 3.6 * len(qualities)))
    for row, (q, (q_label, low, high, higher_better)) in enumerate(qualities.items()):
        for col, (c, c_label) in enumerate(costs.items()):
            ax = axes[row][col]
            for _, r in table.iterrows():
                ax.errorbar(r[c], r[q], yerr=[[r[q] - r[low]], [r[high] - r[q]]], fmt="o",
                            color=palette[r[label]], capsize=3, label=r[label])
            sign = -1 if higher_better else 1
            front, best = [], np.inf
            for _, r in table.sort_values([c, q]).iterrows():
                if sign * r[q] < best:
                    best = sign * r[q]
                    front.append((r[c], r[q]))
            ax.plot(*zip(*front), color="grey", linewidth=1, zorder=0)
            ax.set(xlabel=c_label, ylabel=q_label if col == 0 else "")
            if not higher_better:
                ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 4), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def healing_curves(curve, title: str, *, dense_ppl: float | None = None, aim: float = 0.5):
    """Recovery against CPU time, from :func:`shortgpt_lite.curves.healing_curve`: one
    line per run through its checkpoints (step 0 is the pruned model), perplexity on the
    left (log axis, 95% interval over windows; ``dense_ppl`` dashed) and the share of the
    log-perplexity gap closed on the right (95% interval; ``aim`` dotted)."""
    runs = list(dict.fromkeys(curve["run"]))
    palette = dict(zip(runs, sns.color_palette("colorblind", len(runs))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        part = curve[curve["run"] == run].sort_values("step")
        minutes = part["seconds"] / 60
        left.errorbar(minutes, part["ppl"], yerr=[part["ppl"] - part["ppl_ci_low"],
                                                  part["ppl_ci_high"] - part["ppl"]],
                      fmt="o-", color=palette[run], capsize=3, label=run)
        right.errorbar(minutes, part["closed"], yerr=[part["closed"] - part["closed_low"],
                                                      part["closed_high"] - part["closed"]],
                       fmt="o-", color=palette[run], capsize=3, label=run)
    if dense_ppl is not None:
        left.axhline(dense_ppl, color="gray", linestyle="--", linewidth=1, label="unpruned")
    right.axhline(aim, color="gray", linestyle=":", linewidth=1, label=f"{aim:.0%} of the gap")
    right.axhline(0, color="black", linewidth=0.6)
    left.set(yscale="log", xlabel="healing time, CPU minutes (2 cores)",
             ylabel="perplexity (95% interval)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    right.set(xlabel="healing time, CPU minutes (2 cores)", ylabel="share of the gap closed")
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
