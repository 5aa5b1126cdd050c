"""Reading a stored removal run: curves, ranks across k, and paired comparisons.

The removal experiment (:mod:`shortgpt_lite.experiments`) stores the negative
log-likelihood of every plan on every evaluation window and the verdict on every
benchmark item. Everything a chapter says about it is computed here:

* **Perplexity of a plan** :math:`\\mathrm{PPL} = \\exp(\\bar\\ell)`, with
  :math:`\\bar\\ell` the mean NLL over windows, and a 95% bootstrap interval over windows.
* **Area under the curve** of an ordering: the mean log-perplexity over
  :math:`k = 1 \\dots K`, :math:`\\mathrm{AUC} = \\frac1K \\sum_k \\bar\\ell_k`, so one
  number ranks orderings across the whole curve rather than at one :math:`k`.
* **Paired differences**: two orderings are compared on the *same* windows (or items), the
  bootstrap resampling windows together, so what is common to both cancels
  (:func:`shortgpt_lite.experiments.paired_difference`).
* **Random orderings** are several seeds; their curve is the median, their band the range.
"""

from __future__ import annotations

import math

import pandas as pd

from .evaluate import binomial_ci, bootstrap_interval
from .experiments import Result, paired_difference, perplexity_ratio

__all__ = ["DATA_FREE", "accuracy_drop", "accuracy_table", "area_under_curve",
           "compare_accuracy", "compare_orderings", "curve_table", "family", "rank_table",
           "window_nll"]

DATA_FREE = ("sequential", "reverse", "random")


def family(ordering: str) -> str:
    """``random:3`` is one seed of ``random``; every other ordering is its own family."""
    return ordering.split(":", 1)[0]


def window_nll(result: Result) -> pd.DataFrame:
    """Mean NLL per window: index ``window``, one column per ``(ordering, k)``."""
    plans, ppl = result["plans"], result["ppl"]
    by_plan = ppl.pivot(index="window", columns="removed", values="nll")
    columns = {(o, int(k)): by_plan[r] for o, k, r in
               plans[["ordering", "k", "removed"]].itertuples(index=False)}
    out = pd.DataFrame(columns)
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["ordering", "k"])
    return out


def curve_table(result: Result, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per ordering and ``k``: ``ordering``, ``family``, ``k``, ``removed``, ``nll``,
    ``ppl`` and its 95% bootstrap interval over windows ``ppl_ci_low`` .. ``ppl_ci_high``."""
    nll = window_nll(result)
    removed = result["plans"].set_index(["ordering", "k"])["removed"]
    rows = []
    for (o, k), values in nll.items():
        low, high = bootstrap_interval(values.to_numpy(), n_boot=n_boot, seed=seed)
        mean = float(values.mean())
        rows.append({"ordering": o, "family": family(o), "k": k, "removed": removed[(o, k)],
                     "nll": mean, "ppl": math.exp(mean), "ppl_ci_low": math.exp(low),
                     "ppl_ci_high": math.exp(high)})
    return pd.DataFrame(rows)


def _ks(result: Result, ks) -> list[int]:
    return sorted(ks) if ks is not None else list(range(1, int(result["plans"]["k"].max()) + 1))


def _per_window_auc(result: Result, ks) -> pd.DataFrame:
    """Each window's mean NLL over ``ks``, one column per ordering, and the random seeds'
    mean as ``random``."""
    nll = window_nll(result)
    keep = [c for c in nll.columns if c[1] in ks]
    auc = nll[keep].T.groupby(level="ordering").mean().T
    seeds = [c for c in auc.columns if family(c) == "random" and c != "random"]
    if seeds:
        auc["random"] = auc[seeds].mean(axis=1)
    return auc


def area_under_curve(result: Result, *, ks=None, n_boot: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Mean log-perplexity over ``ks`` (default ``1 .. max``) per ordering, lower is better,
    with a 95% bootstrap interval over windows; random seeds also pooled as ``random``
    (the mean of their curves). Sorted best first."""
    auc = _per_window_auc(result, _ks(result, ks))
    rows = []
    for o, values in auc.items():
        low, high = bootstrap_interval(values.to_numpy(), n_boot=n_boot, seed=seed)
        rows.append({"ordering": o, "auc": float(values.mean()), "auc_ci_low": low,
                     "auc_ci_high": high, "seed_of_random": o != "random" and
                     family(o) == "random"})
    return pd.DataFrame(rows).sort_values("auc").reset_index(drop=True)


def compare_orderings(result: Result, a: str, b: str, *, ks=None, n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """``AUC(a) - AUC(b)`` in nats (negative: ``a`` keeps perplexity lower across ``ks``),
    with a paired bootstrap over windows; ``random`` means the mean of the seeds.
    ``ratio`` is ``exp`` of the difference: the geometric-mean factor of perplexity."""
    auc = _per_window_auc(result, _ks(result, ks))
    for name in (a, b):
        if name not in auc.columns:
            raise ValueError(f"No ordering {name!r} in this run; it has "
                             f"{', '.join(map(str, auc.columns))}.")
    return perplexity_ratio(auc[a], auc[b], n_boot=n_boot, seed=seed)


def rank_table(result: Result, orderings) -> pd.DataFrame:
    """Rank (1 = lowest perplexity) of each of ``orderings`` at every ``k >= 1``: rows ``k``,
    columns the orderings."""
    curves = curve_table(result, n_boot=1)
    wide = curves[curves["k"] > 0].pivot(index="k", columns="ordering", values="ppl")
    return wide[list(orderings)].rank(axis=1, method="min").astype(int)


def _items(result: Result) -> pd.DataFrame:
    plans, items = result["plans"], result["items"]
    return plans.merge(items, on="removed")


def accuracy_table(result: Result, *, by_task: bool = False) -> pd.DataFrame:
    """Accuracy of each ordering at each measured ``k`` with its 95% Wilson interval:
    pooled over all items (``task = "all"``), and per task with ``by_task=True``. Random
    seeds appear one by one and pooled as ``random``."""
    df = _items(result)
    pooled = df[df["ordering"].map(family) == "random"].assign(ordering="random")
    if not pooled.empty:
        df = pd.concat([df, pooled])
    keys = ["ordering", "k"] + (["task"] if by_task else [])
    rows = []
    for key, part in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n, right = len(part), int(part["correct"].sum())
        low, high = binomial_ci(right, n)
        rows.append(dict(zip(keys, key)) | {"task": key[2] if by_task else "all", "n": n,
                                            "acc": right / n, "acc_ci_low": low,
                                            "acc_ci_high": high})
    return pd.DataFrame(rows)


def _verdicts(items: pd.DataFrame, name: str, k: int) -> pd.Series:
    """Each item's verdict under ``name`` at ``k``; ``random`` is the mean over its seeds."""
    at_k = items[items["k"] == k]
    part = at_k[at_k["ordering"].map(family) == "random"] if name == "random" \
        else at_k[at_k["ordering"] == name]
    if part.empty:
        raise ValueError(f"No items for ordering {name!r} at k = {k}.")
    return part.groupby("item")["correct"].mean()


def compare_accuracy(result: Result, a: str, b: str, k: int, *, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """Accuracy of ordering ``a`` minus that of ``b`` at ``k``, paired over the same items;
    ``random`` means the mean verdict over its seeds."""
    items = _items(result)
    return paired_difference(_verdicts(items, a, k), _verdicts(items, b, k), n_boot=n_boot,
                             seed=seed)


def accuracy_drop(result: Result, ordering: str, k: int, *, n_boot: int = 2000,
                  seed: int = 0) -> dict:
    """Accuracy of ``ordering`` at ``k`` minus the unpruned model's, paired over items."""
    items = _items(result)
    base = items[items["k"] == 0].groupby("item")["correct"].first()
    return paired_difference(_verdicts(items, ordering, k), base, n_boot=n_boot, seed=seed)

