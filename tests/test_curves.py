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


def _comparison_result():
    """A comparison run written by hand: two corpora of three windows, four items."""
    nll = {"dense": [1.0, 2.0, 3.0, 1.5, 2.5, 3.5], "a": [1.5, 2.1, 3.9, 1.6, 2.9, 3.6],
           "b": [1.2, 2.6, 3.1, 1.9, 2.6, 4.0]}
    ppl = pd.DataFrame([{"variant": v, "corpus": c, "window": w, "nll": x[3 * i + w]}
                        for v, x in nll.items() for i, c in enumerate(["wiki", "code"])
                        for w in range(3)])
    right = {"dense": [1, 1, 0, 1], "a": [1, 0, 0, 1], "b": [0, 0, 0, 1]}
    items = pd.DataFrame([{"variant": v, "task": "piqa", "item": i, "correct": c}
                          for v, xs in right.items() for i, c in enumerate(xs)])
    variants = pd.DataFrame([{"variant": v, "method": v, "budget": 0.0 if v == "dense" else 0.25,
                              "params_removed": p, "file_bytes": f}
                             for v, p, f in [("dense", 0.0, 400), ("a", 0.25, 300),
                                             ("b", 0.25, 400)]])
    return ex.Result("comparison", "tiny", {}, {"variants": variants, "ppl": ppl,
                                                "items": items}, {})


def test_variant_table_reads_every_method_against_dense_by_hand():
    t = curves.variant_table(_comparison_result()).set_index("variant")
    assert t.loc["dense", "ppl_x"] == pytest.approx(1.0) and t.loc["dense", "acc_diff"] == 0
    wiki = np.mean([1.5 - 1.0, 2.1 - 2.0, 3.9 - 3.0])
    assert t.loc["a", "ppl_x_wiki"] == pytest.approx(math.exp(wiki))
    pooled = np.mean([0.5, 0.1, 0.9, 0.1, 0.4, 0.1])
    assert t.loc["a", "ppl_x"] == pytest.approx(math.exp(pooled))
    assert t.loc["a", "ppl_x_low"] <= t.loc["a", "ppl_x"] <= t.loc["a", "ppl_x_high"]
    assert t.loc["a", "file_x"] == 0.75 and t.loc["b", "file_x"] == 1.0
    assert t.loc["b", "acc"] == 0.25 and t.loc["b", "acc_diff"] == pytest.approx(-0.5)
    assert t.loc["b", "acc_ci_low"] < 0.25 < t.loc["b", "acc_ci_high"]
    assert (t["n_items"] == 4).all()


def test_compare_variants_pairs_windows_and_items():
    r = _comparison_result()
    d = curves.compare_variants(r, "b", "a")
    want = np.mean([1.2 - 1.5, 2.6 - 2.1, 3.1 - 3.9, 1.9 - 1.6, 2.6 - 2.9, 4.0 - 3.6])
    assert d["ppl"]["ratio"] == pytest.approx(math.exp(want)) and d["ppl"]["n"] == 6
    assert d["acc"]["mean"] == pytest.approx(-0.25) and d["acc"]["n"] == 4
    with pytest.raises(ValueError, match="No variant 'c'"):
        curves.compare_variants(r, "c", "a")
    code = curves.compare_variants(r, "b", "a", corpus="code")
    assert code["ppl"]["ratio"] == pytest.approx(math.exp(np.mean([0.3, -0.3, 0.4])))
    assert code["ppl"]["n"] == 3 and code["acc"]["mean"] == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="No corpus 'law' in this run; it has code, wiki"):
        curves.compare_variants(r, "b", "a", corpus="law")


def _healing_result():
    """A healing run written by hand: four windows, checkpoints at 0, 5 and 10 steps."""
    nll = {("dense", 0): [1.0, 2.0, 3.0, 2.0], ("r", 0): [2.0, 3.0, 4.5, 2.5],
           ("r", 5): [1.5, 2.5, 3.5, 2.5], ("r", 10): [1.0, 2.5, 3.5, 2.0],
           ("s", 0): [2.0, 3.0, 4.5, 2.5], ("s", 10): [2.0, 3.0, 4.0, 2.5]}
    ppl = pd.DataFrame([{"run": r, "step": s, "seconds": 6.0 * s, "window": w, "nll": x}
                        for (r, s), xs in nll.items() for w, x in enumerate(xs)])
    runs = pd.DataFrame([{"run": r, "step": s, "seconds": 6.0 * s, "loss": 1.0,
                          "ordering": r, "recipe": "lora", "removed": "1 2"}
                         for r, s in [("r", 5), ("r", 10), ("s", 10)]])
    right = {("dense", 0): [1, 1, 1, 0], ("r", 0): [0, 0, 1, 0], ("r", 10): [1, 0, 1, 0],
             ("s", 0): [0, 0, 1, 0], ("s", 10): [0, 0, 0, 0]}
    items = pd.DataFrame([{"run": r, "step": s, "task": "piqa", "item": i, "correct": c}
                          for (r, s), xs in right.items() for i, c in enumerate(xs)])
    return ex.Result("healing", "tiny", {}, {"ppl": ppl, "runs": runs, "items": items,
                                             "scores": pd.DataFrame()}, {})


def test_healing_curve_reads_the_share_of_the_log_perplexity_gap_closed():
    t = curves.healing_curve(_healing_result()).set_index(["run", "step"])
    assert list(t.loc["r"].index) == [0, 5, 10] and list(t.loc["s"].index) == [0, 10]
    assert t.loc[("r", 0), "closed"] == 0 and t.loc[("r", 0), "ppl_x"] == pytest.approx(
        math.exp(12 / 4 - 8 / 4))
    # gap: mean 3.0 before against 2.0 dense; at step 5 mean 2.5 (half), at 10 mean 2.25
    assert t.loc[("r", 5), "closed"] == pytest.approx(0.5)
    assert t.loc[("r", 10), "closed"] == pytest.approx(0.75)
    assert t.loc[("r", 10), "ppl"] == pytest.approx(math.exp(2.25))
    assert t.loc[("r", 10), "closed_low"] <= 0.75 <= t.loc[("r", 10), "closed_high"]
    assert t.loc[("r", 10), "seconds"] == 60.0 and t.loc[("r", 10), "recipe"] == "lora"


def test_healing_accuracy_and_paired_comparisons_of_runs():
    r = _healing_result()
    acc = curves.healing_accuracy(r).set_index("run")
    assert acc.loc["r", "acc_dense"] == 0.75 and acc.loc["r", "acc_before"] == 0.25
    assert acc.loc["r", "acc_after"] == 0.5 and acc.loc["r", "change"] == 0.25
    assert acc.loc["r", "closed"] == pytest.approx(0.5)  # 0.25 of a 0.5 gap
    assert acc.loc["s", "change"] == -0.25 and acc.loc["s", "closed"] == pytest.approx(-0.5)
    d = curves.compare_healed(r, "r", "s")
    want = np.mean([1.0 - 2.0, 2.5 - 3.0, 3.5 - 4.0, 2.0 - 2.5])
    assert d["ppl"]["ratio"] == pytest.approx(math.exp(want)) and d["acc"]["mean"] == 0.5
    before = curves.compare_healed(r, "r", "s", when="before")
    assert before["ppl"]["mean"] == 0 and before["acc"]["mean"] == 0
    with pytest.raises(ValueError, match="No run 'x'"):
        curves.compare_healed(r, "x", "s")
    # a run measured on perplexity only has no accuracy row, and no accuracy comparison
    r.tables["items"] = r["items"][r["items"]["run"] != "s"]
    assert list(curves.healing_accuracy(r)["run"]) == ["r"]
    assert curves.compare_healed(r, "r", "s")["acc"] is None
    with pytest.raises(ValueError, match="before' or 'after"):
        curves.compare_healed(r, "r", "s", when="during")


def test_healing_curves_draws_each_run_through_its_checkpoints():
    import matplotlib.pyplot as plt

    from shortgpt_lite.plots import healing_curves

    curve = curves.healing_curve(_healing_result())
    fig = healing_curves(curve, "tiny", dense_ppl=math.exp(2.0))
    left, right = fig.axes[:2]
    r = curve[curve["run"] == "r"]
    assert list(left.lines[0].get_xdata()) == pytest.approx(list(r["seconds"] / 60))
    assert list(left.lines[0].get_ydata()) == pytest.approx(list(r["ppl"]))
    assert list(right.lines[0].get_ydata()) == pytest.approx(list(r["closed"]))
    assert left.get_yscale() == "log"
    plt.close(fig)


def _generation_pair():
    right = {"dense": [1, 1, 0, 1], "removed": [0, 1, 0, 0]}
    items = pd.DataFrame([{"model": m, "item": i, "correct": c, "removed": "1 2"}
                          for m, xs in right.items() for i, c in enumerate(xs)])
    timings = pd.DataFrame([{"variant": m, "repeat": r, "position": 0, "prefill_seconds": s + r,
                             "decode_tokens_per_s": 10.0 / (s + r)}
                            for m, s in [("dense", 1.0), ("removed", 0.5)] for r in range(2)])
    gen = ex.Result("generation", "tiny", {"n_items": 4, "item_seed": 0},
                    {"items": items, "timings": timings, "samples": pd.DataFrame()}, {})
    lambada = pd.DataFrame({"run": "bi/lora", "item": range(4), "correct": [1, 1, 0, 0],
                            "removed": "1 2"})
    heal = ex.Result("healing", "tiny", {"lambada_items": 4, "item_seed": 0},
                     {"lambada": lambada}, {})
    return gen, heal


def test_generation_table_pairs_passages_against_removal():
    gen, heal = _generation_pair()
    t = curves.generation_table(gen, heal)
    assert list(t.index) == ["dense", "removed", "healed"]
    assert t.loc["dense", "lambada"] == 0.75 and t.loc["dense", "diff"] == 0.5
    assert t.loc["removed", "diff"] == 0 and t.loc["healed", "diff"] == 0.25
    assert t.loc["healed", "lambada_low"] < 0.5 < t.loc["healed", "lambada_high"]
    assert t.loc["removed", "prefill_seconds"] == 0.5 and t.loc["dense", "decode_tokens_per_s"] == 10.0
    assert math.isnan(t.loc["healed", "prefill_seconds"])
    assert list(curves.generation_table(gen).index) == ["dense", "removed"]
    with pytest.raises(ValueError, match="No model 'x'"):
        curves.generation_table(gen, against="x")


def test_generation_table_refuses_a_healing_run_on_other_passages_or_another_plan():
    gen, heal = _generation_pair()
    heal.params["item_seed"] = 1
    with pytest.raises(ValueError, match="passage seed 0 against 1"):
        curves.generation_table(gen, heal)
    gen, heal = _generation_pair()
    heal.tables["lambada"]["removed"] = "1 3"
    with pytest.raises(ValueError, match="plan 1 2 against 1 3"):
        curves.generation_table(gen, heal)
    gen, heal = _generation_pair()
    heal.tables["lambada"] = None
    with pytest.raises(ValueError, match="lambada_items > 0"):
        curves.generation_table(gen, heal)
