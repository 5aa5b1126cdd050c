"""Reading a removal run: curves, ranks, areas under the curve and paired comparisons,
checked against values computed by hand from the stored rows."""

import math

import numpy as np
import pandas as pd
import pytest

from shortgpt_lite import curves
from shortgpt_lite import experiments as ex
from tiny import byte_tokenizer, tiny_llama

SMALL = {"seq_len": 32, "calibration_windows": 2, "eval_windows": 4,
         "metrics": ["bi", "sequential", "reverse", "random"], "random_seeds": 3,
         "max_remove": 2, "tasks": ["piqa", "winogrande"], "n_items": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return ex.run("removal", "tiny", out=out, progress=False,
                  loaded=(tiny_llama(vocab_size=257, layers=5), byte_tokenizer()), **SMALL)


def test_curve_table_is_the_exp_of_the_mean_window_nll(run):
    table = curves.curve_table(run)
    assert len(table) == 6 * 3  # 6 orderings (3 random seeds), k = 0, 1, 2
    row = table[(table["ordering"] == "reverse") & (table["k"] == 2)].iloc[0]
    removed = run["plans"].set_index(["ordering", "k"]).loc[("reverse", 2), "removed"]
    assert removed == "3 4" == row["removed"]
    nll = run["ppl"][run["ppl"]["removed"] == removed]["nll"].mean()
    assert row["ppl"] == pytest.approx(math.exp(nll))
    assert row["ppl_ci_low"] <= row["ppl"] <= row["ppl_ci_high"]
    assert set(table["family"]) == {"bi", "sequential", "reverse", "random"}
    assert table[table["k"] == 0]["ppl"].nunique() == 1


def test_area_under_the_curve_ranks_orderings_over_every_k(run):
    table = curves.curve_table(run)
    auc = curves.area_under_curve(run).set_index("ordering")
    by_hand = table[(table["ordering"] == "bi") & (table["k"] > 0)]["nll"].mean()
    assert auc.loc["bi", "auc"] == pytest.approx(by_hand)
    seeds = [f"random:{s}" for s in range(3)]
    assert auc.loc["random", "auc"] == pytest.approx(auc.loc[seeds, "auc"].mean())
    assert list(auc["auc"]) == sorted(auc["auc"])


def test_compare_orderings_is_a_paired_difference_of_areas(run):
    auc = curves.area_under_curve(run).set_index("ordering")["auc"]
    d = curves.compare_orderings(run, "bi", "reverse")
    assert d["mean"] == pytest.approx(auc["bi"] - auc["reverse"])
    assert d["low"] <= d["mean"] <= d["high"] and d["n"] == 4
    assert d["ratio"] == pytest.approx(math.exp(d["mean"]))
    same = curves.compare_orderings(run, "bi", "bi")
    assert same["mean"] == 0 and same["zero_inside"]
    with pytest.raises(ValueError, match="No ordering 'taylor'"):
        curves.compare_orderings(run, "taylor", "bi")


def test_ranks_at_every_k(run):
    ranks = curves.rank_table(run, ["bi", "sequential", "reverse"])
    assert list(ranks.index) == [1, 2] and list(ranks.columns) == ["bi", "sequential", "reverse"]
    table = curves.curve_table(run).set_index(["ordering", "k"])["ppl"]
    for k in (1, 2):
        ppl = [table[(o, k)] for o in ranks.columns]
        assert list(ranks.loc[k]) == [1 + sum(q < p for q in ppl) for p in ppl]


def test_accuracy_tables_and_paired_accuracy(run):
    acc = curves.accuracy_table(run)
    assert set(acc["k"]) == {0, 1, 2} and set(acc["task"]) == {"all"}
    bi0 = acc[(acc["ordering"] == "bi") & (acc["k"] == 0)].iloc[0]
    base = run["items"][run["items"]["removed"] == ""]
    assert bi0["acc"] == pytest.approx(base["correct"].mean()) and bi0["n"] == 8
    per_task = curves.accuracy_table(run, by_task=True)
    assert set(per_task["task"]) == {"piqa", "winogrande"}
    pooled = acc[(acc["ordering"] == "random") & (acc["k"] == 2)].iloc[0]
    assert pooled["n"] == 3 * 8
    drop = curves.accuracy_drop(run, "reverse", 2)
    rev = acc[(acc["ordering"] == "reverse") & (acc["k"] == 2)].iloc[0]
    assert drop["mean"] == pytest.approx(rev["acc"] - bi0["acc"])
    d = curves.compare_accuracy(run, "bi", "bi", 2)
    assert d["mean"] == 0
    assert np.isfinite(curves.compare_accuracy(run, "random", "reverse", 2)["mean"])


def test_the_overview_and_accuracy_figures_draw_what_the_tables_hold(run):
    import matplotlib.pyplot as plt

    from shortgpt_lite.plots import accuracy_dots, removal_overview

    table = curves.curve_table(run)
    fig = removal_overview(table, "tiny")
    left, right = fig.axes
    assert left.get_yscale() == "log" and right.get_yscale() == "linear"
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert "random (median and range of 3 seeds)" in labels and "reverse" in labels
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["bi"]
    # a metric far off the others' scale leaves the linear panel, named in its title
    wild = table.copy()
    wild.loc[wild["ordering"] == "bi", "family"] = "wild"
    wild = pd.concat([wild, table[table["ordering"] == "bi"].assign(
        family="calm", ordering="calm", ppl=lambda d: d["ppl"] / 100)])
    fig2 = removal_overview(wild, "tiny")
    assert [t.get_text() for t in fig2.axes[1].get_legend().get_texts()] == ["calm"]
    assert "off this scale: wild" in fig2.axes[1].get_title()
    plt.close(fig2)
    bi = table[table["ordering"] == "bi"].sort_values("k")
    assert list(right.lines[0].get_ydata()) == pytest.approx(list(bi["ppl"]))
    plt.close(fig)
    acc = curves.accuracy_table(run)
    fig = accuracy_dots(acc[acc["k"].isin([0, 2])], "tiny", chance=0.5)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] and \
        not any(":" in t.get_text() for t in ax.get_yticklabels())
    plt.close(fig)
