"""Reading stored runs: a removal run's curves, ranks across k and paired comparisons, a
comparison run's methods against dense and against each other, and a healing run's
recovery.

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

import numpy as np
import pandas as pd

from .costs import summarise_speeds
from .evaluate import binomial_ci, bootstrap_interval
from .experiments import Result, paired_difference, perplexity_ratio

__all__ = ["DATA_FREE", "accuracy_drop", "accuracy_table", "area_under_curve",
           "compare_accuracy", "compare_healed", "compare_orderings", "compare_variants",
           "curve_table", "family", "generation_table", "healing_accuracy", "healing_curve",
           "rank_table", "speed_table", "variant_table", "window_nll"]

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



# ------------------------------------------------------------ reading a comparison run
#
# The comparison experiment stores one row per (variant, corpus, window) and per (variant,
# item), so every method is read against dense, or against another method, on the same
# units.


def _variant_nll(result: Result) -> pd.DataFrame:
    """NLL per evaluation window: index ``(corpus, window)``, one column per variant (a run
    on one corpus, such as ``wanda``, names it in its parameters)."""
    ppl = result["ppl"]
    if "corpus" not in ppl.columns:
        ppl = ppl.assign(corpus=result.params["corpus"])
    return ppl.pivot_table(index=["corpus", "window"], columns="variant", values="nll")


def _variant_verdicts(result: Result, name: str) -> pd.Series:
    items = result["items"]
    part = items[items["variant"] == name]
    if part.empty:
        raise ValueError(f"No variant {name!r} in this run; it has "
                         f"{', '.join(result['variants']['variant'])}.")
    return part.set_index("item")["correct"]


def _scored_on_items(result: Result, name: str) -> bool:
    return bool((result["items"]["variant"] == name).any())


def compare_variants(result: Result, a: str, b: str, *, corpus: str | None = None,
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """Variant ``a`` against ``b`` of a stored comparison or wanda run, on the same units:
    ``ppl`` is :func:`perplexity_ratio` over every evaluation window of every corpus pooled,
    or of ``corpus`` alone (``a`` over ``b``), and ``acc`` the accuracy of ``a`` minus that
    of ``b``, paired over every benchmark item (:func:`paired_difference`); ``acc`` is
    ``None`` when the run scored either of them on perplexity alone."""
    nll = _variant_nll(result)
    for name in (a, b):
        if name not in nll.columns:
            raise ValueError(f"No variant {name!r} in this run; it has "
                             f"{', '.join(map(str, nll.columns))}.")
    if corpus is not None:
        corpora = list(dict.fromkeys(nll.index.get_level_values("corpus")))
        if corpus not in corpora:
            raise ValueError(f"No corpus {corpus!r} in this run; it has {', '.join(corpora)}.")
        nll = nll.loc[corpus]
    acc = None
    if _scored_on_items(result, a) and _scored_on_items(result, b):
        acc = paired_difference(_variant_verdicts(result, a), _variant_verdicts(result, b),
                                n_boot=n_boot, seed=seed)
    return {"ppl": perplexity_ratio(nll[a], nll[b], n_boot=n_boot, seed=seed), "acc": acc}


def variant_table(result: Result, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per variant of a stored comparison run: its share of parameters removed and
    its file against dense; its perplexity over dense on each corpus and on all windows
    pooled (``ppl_x``, with a 95% interval paired over windows); and its accuracy over all
    items (``acc``, 95% Wilson interval) with its difference from dense paired over items
    (``acc_diff``)."""
    variants = result["variants"].set_index("variant")
    if "dense" not in variants.index:
        raise ValueError("This comparison run has no dense variant to read the others against.")
    nll = _variant_nll(result)
    corpora = list(dict.fromkeys(nll.index.get_level_values("corpus")))
    rows = []
    for name, v in variants.iterrows():
        row = {"variant": name, "method": v["method"], "budget": v["budget"],
               "params_removed": v["params_removed"],
               "file_x": v["file_bytes"] / variants.loc["dense", "file_bytes"]}
        for corpus in corpora:
            r = perplexity_ratio(nll.loc[corpus, name], nll.loc[corpus, "dense"],
                                 n_boot=n_boot, seed=seed)
            row[f"ppl_x_{corpus}"] = r["ratio"]
        pooled = perplexity_ratio(nll[name], nll["dense"], n_boot=n_boot, seed=seed)
        row |= {"ppl_x": pooled["ratio"], "ppl_x_low": pooled["ratio_low"],
                "ppl_x_high": pooled["ratio_high"]}
        verdicts = _variant_verdicts(result, name)
        low, high = binomial_ci(int(verdicts.sum()), len(verdicts))
        diff = paired_difference(verdicts, _variant_verdicts(result, "dense"), n_boot=n_boot,
                                 seed=seed)
        row |= {"n_items": len(verdicts), "acc": float(verdicts.mean()), "acc_ci_low": low,
                "acc_ci_high": high, "acc_diff": diff["mean"], "acc_diff_low": diff["low"],
                "acc_diff_high": diff["high"]}
        rows.append(row)
    return pd.DataFrame(rows)


def speed_table(result: Result) -> pd.DataFrame:
    """One row per variant of a stored costs run: its file against dense, and its fastest
    prefill and decode with their spreads (:func:`shortgpt_lite.costs.summarise_speeds`),
    as time per prompt and per generated token against dense (``prefill_x``, ``decode_x``;
    below 1 is faster)."""
    variants = result["variants"].set_index("variant")
    speeds = summarise_speeds(result["timings"].rename(columns={"variant": "model"}))
    table = variants[["method", "budget", "params_removed", "file_bytes"]].join(speeds)
    dense = table.loc["dense"]
    table["file_x"] = table["file_bytes"] / dense["file_bytes"]
    table["prefill_x"] = table["prefill_seconds"] / dense["prefill_seconds"]
    table["decode_x"] = dense["decode_tokens_per_s"] / table["decode_tokens_per_s"]
    return table.rename_axis("variant").reset_index()


# --------------------------------------------------------------- reading a healing run
#
# The healing experiment stores the NLL of every evaluation window for the unpruned model
# (run "dense") and for every run at step 0 (pruned, before healing) and at each
# checkpoint, and each item's verdict before and after. How much of the damage a recipe
# undoes is read as the share of the gap it closes, on the log-perplexity scale
#
#     closed = (l_before - l_step) / (l_before - l_dense),
#
# with l the mean NLL over windows: 0 is no recovery, 1 the unpruned model's perplexity
# (Kim et al. 2024 and Chen et al. 2024 report recovery as a share of the unpruned
# model's score in the same spirit). Accuracy's share is (after - before) / (dense -
# before). Intervals resample the windows (or items) of all three together.


def _share_closed(before, now, dense, *, n_boot: int, seed: int) -> tuple[float, float, float]:
    """``(share, low, high)`` of ``(mean(before) - mean(now)) / (mean(before) - mean(dense))``
    with a percentile-bootstrap interval that resamples the units of all three together."""
    both = pd.concat([before.rename("b"), now.rename("n"), dense.rename("d")], axis=1,
                     join="inner").dropna().to_numpy(float)
    if len(both) < 2:
        return math.nan, math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, len(both), size=(n_boot, len(both)))
    b, n, d = (both[:, i][draws].mean(axis=1) for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (b - n) / (b - d)
    shares[~np.isfinite(shares)] = np.nan  # a resample with no gap says nothing
    share = (both[:, 0].mean() - both[:, 1].mean()) / (both[:, 0].mean() - both[:, 2].mean())
    low, high = np.nanpercentile(shares, [2.5, 97.5])
    return float(share), float(low), float(high)


def _healing_nll(result: Result) -> pd.DataFrame:
    """NLL per window: index ``window``, one column per ``(run, step)``."""
    return result["ppl"].pivot_table(index="window", columns=["run", "step"], values="nll")


def healing_curve(result: Result, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per healing run and checkpoint (step 0 is the pruned model before healing):
    ``run``, ``plan``, ``recipe``, ``removed``, ``step``, ``seconds`` of healing so far,
    ``ppl`` with its 95% bootstrap interval over windows, ``ppl_x`` against the unpruned
    model, and ``closed``, the share of the log-perplexity gap closed, with its 95%
    interval ``closed_low`` .. ``closed_high``."""
    nll, ppl, runs = _healing_nll(result), result["ppl"], result["runs"]
    dense = nll[("dense", 0)]
    info = runs.groupby("run")[["ordering", "recipe", "removed"]].first()
    seconds = ppl.groupby(["run", "step"])["seconds"].first()
    rows = []
    for run in info.index:
        for step in sorted(nll[run].columns):
            values = nll[(run, step)]
            low, high = bootstrap_interval(values.to_numpy(), n_boot=n_boot, seed=seed)
            closed = _share_closed(nll[(run, 0)], values, dense, n_boot=n_boot, seed=seed)
            rows.append({"run": run, "plan": info.loc[run, "ordering"],
                         "recipe": info.loc[run, "recipe"], "removed": info.loc[run, "removed"],
                         "step": int(step), "seconds": float(seconds[(run, step)]),
                         "ppl": math.exp(values.mean()), "ppl_ci_low": math.exp(low),
                         "ppl_ci_high": math.exp(high),
                         "ppl_x": math.exp(values.mean() - dense.mean()),
                         "closed": closed[0], "closed_low": closed[1], "closed_high": closed[2]})
    return pd.DataFrame(rows)


def _healing_verdicts(result: Result, run: str, when: str) -> pd.Series:
    items = result["items"]
    part = items[items["run"] == run]
    if part.empty:
        runs = ", ".join(dict.fromkeys(items["run"]))
        raise ValueError(f"No run {run!r} in this healing run; it has {runs}.")
    step = part["step"].min() if when == "before" else part["step"].max()
    return part[part["step"] == step].set_index("item")["correct"]


def healing_accuracy(result: Result, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per healing run: pooled accuracy of the unpruned model (``acc_dense``), of
    the pruned one (``acc_before``) and of the healed one (``acc_after``), each with its
    95% Wilson interval; ``change``, after minus before paired over items, with its 95%
    interval; and ``closed``, the share of the accuracy gap closed, with its interval.
    Runs measured on perplexity only (plans other than the first) have no row."""
    dense, scored = _healing_verdicts(result, "dense", "after"), set(result["items"]["run"])
    rows = []
    for run, part in result["runs"].groupby("run", sort=False):
        if run not in scored:
            continue
        before, after = (_healing_verdicts(result, run, w) for w in ("before", "after"))
        row = {"run": run, "plan": part["ordering"].iloc[0], "recipe": part["recipe"].iloc[0],
               "n": len(after)}
        for name, v in (("dense", dense), ("before", before), ("after", after)):
            low, high = binomial_ci(int(v.sum()), len(v))
            row |= {f"acc_{name}": float(v.mean()), f"acc_{name}_low": low,
                    f"acc_{name}_high": high}
        change = paired_difference(after, before, n_boot=n_boot, seed=seed)
        closed = _share_closed(-before, -after, -dense, n_boot=n_boot, seed=seed)
        rows.append(row | {"change": change["mean"], "change_low": change["low"],
                           "change_high": change["high"], "closed": closed[0],
                           "closed_low": closed[1], "closed_high": closed[2]})
    return pd.DataFrame(rows)


def compare_healed(result: Result, a: str, b: str, *, when: str = "after", n_boot: int = 2000,
                   seed: int = 0) -> dict:
    """Run ``a`` against run ``b`` of a stored healing run (``"dense"`` is the unpruned
    model), both after healing (``when="after"``) or both before it (``"before"``), on the
    same units: ``ppl`` is :func:`perplexity_ratio` over the evaluation windows (``a``
    over ``b``), ``acc`` the accuracy of ``a`` minus that of ``b`` paired over items (None
    when either run was measured on perplexity only)."""
    if when not in ("before", "after"):
        raise ValueError(f"when is 'before' or 'after' healing, got {when!r}.")
    nll = _healing_nll(result)

    def final(run):
        if run not in nll.columns.get_level_values("run"):
            raise ValueError(f"No run {run!r} in this healing run; it has "
                             f"{', '.join(dict.fromkeys(nll.columns.get_level_values('run')))}.")
        steps = nll[run].columns
        return nll[(run, steps.min() if when == "before" else steps.max())]

    scored = set(result["items"]["run"])
    acc = paired_difference(_healing_verdicts(result, a, when), _healing_verdicts(result, b, when),
                            n_boot=n_boot, seed=seed) if {a, b} <= scored else None
    return {"ppl": perplexity_ratio(final(a), final(b), n_boot=n_boot, seed=seed), "acc": acc}


def generation_table(result: Result, healing: Result | None = None, *,
                     against: str = "removed", n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per model of a stored generation run: LAMBADA accuracy decoded token by
    token (``lambada``, 95% Wilson interval), its difference from ``against`` paired over
    the passages (``diff``, 95% interval), and the fastest prefill (``prefill_seconds``)
    and decoding speed (``decode_tokens_per_s``) of the interleaved timings. A healing run
    adds a ``healed`` row, its first run's healed model on the same passages; it has the
    removed model's shapes, so it is not timed (its speeds are NaN)."""
    verdicts = result["items"].pivot(index="item", columns="model", values="correct").astype(float)
    if healing is not None:
        verdicts["healed"] = _healed_verdicts(result, healing)
    if against not in verdicts:
        raise ValueError(f"No model {against!r} in this generation run; it has "
                         f"{', '.join(verdicts.columns)}.")
    speeds = summarise_speeds(result["timings"].rename(columns={"variant": "model"}))
    speeds = speeds.reindex(verdicts.columns)  # NaN for the healed model, which is not timed
    rows = []
    for model in verdicts.columns:
        v = verdicts[model]
        low, high = binomial_ci(int(v.sum()), len(v))
        d = paired_difference(v, verdicts[against], n_boot=n_boot, seed=seed)
        rows.append({"model": model, "n": len(v), "lambada": float(v.mean()), "lambada_low": low,
                     "lambada_high": high, "diff": d["mean"], "diff_low": d["low"],
                     "diff_high": d["high"],
                     "prefill_seconds": float(speeds.loc[model, "prefill_seconds"]),
                     "decode_tokens_per_s": float(speeds.loc[model, "decode_tokens_per_s"])})
    return pd.DataFrame(rows).set_index("model")


def _healed_verdicts(generation: Result, healing: Result) -> pd.Series:
    """The healing run's LAMBADA verdicts, after checking they are on the generation run's
    passages and model, and heal the plan the generation run removes."""
    g, h = generation.params, healing.params
    lambada = healing.tables.get("lambada")
    if lambada is None or lambada.empty:
        raise ValueError("This healing run decoded no LAMBADA passages; rerun it with "
                         "lambada_items > 0.")
    same = {"model": (generation.model, healing.model),
            "passages": (g["n_items"], h["lambada_items"]),
            "passage seed": (g["item_seed"], h["item_seed"]),
            "plan": (str(generation["items"]["removed"].iloc[0]), str(lambada["removed"].iloc[0]))}
    differ = [f"{k} {a} against {b}" for k, (a, b) in same.items() if a != b]
    if differ:
        raise ValueError("The generation and healing runs cannot be paired: "
                         + "; ".join(differ) + ". Run both with the same model, passages and plan.")
    return lambada.set_index("item")["correct"].astype(float)
