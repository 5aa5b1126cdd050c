"""The shared figures: each returns its Axes, titled and labelled, with one bar or cell per
value. Small synthetic input, no model, a few seconds."""

import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from shortgpt_lite import plots, removal_curves, speedup_plot


@pytest.fixture(autouse=True)
def _close_figures():
    plots.book_style()
    yield
    plt.close("all")


def _labelled(ax, title):
    assert ax.get_title() == title
    assert ax.get_xlabel() and ax.get_ylabel()


def test_similarity_heatmap_has_one_cell_per_pair():
    m = torch.rand(7, 7)
    ax = plots.similarity_heatmap(m, title="S")
    _labelled(ax, "S")
    assert ax.collections[0].get_array().size == 49


def test_adjacent_similarity_draws_one_line_per_model():
    ax = plots.adjacent_similarity({"a": torch.rand(5), "b": [0.9, 0.95, 0.99]}, title="adj")
    _labelled(ax, "adj")
    assert len(ax.get_lines()) == 2
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [5, 3]


def test_bi_profile_one_bar_per_layer_and_lowest_highlighted():
    scores = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.4])
    ax = plots.bi_profile(scores, title="BI", lowest=2)
    _labelled(ax, "BI")
    assert len(ax.patches) == 5
    colours = [p.get_facecolor() for p in ax.patches]
    assert colours[1] == colours[3] != colours[0]


def test_bi_profile_on_a_log_axis_draws_dots_not_bars():
    scores = torch.tensor([1.0, 0.1, 0.03, 0.05, 0.4])
    ax = plots.bi_profile(scores, title="BI", lowest=2, log=True)
    assert ax.get_yscale() == "log" and len(ax.patches) == 0
    dots = ax.collections[0]
    assert list(dots.get_offsets()[:, 1]) == pytest.approx(scores.tolist())
    colours = [tuple(c) for c in dots.get_facecolors()]
    assert colours[2] == colours[3] != colours[0]


def test_angular_distance_heatmap_blanks_nan_and_marks_minima():
    n_layers = 6
    d = torch.full((3, n_layers), float("nan"))
    for n in range(1, 4):
        d[n - 1, : n_layers - n + 1] = torch.rand(n_layers - n + 1)
    ax = plots.angular_distance_heatmap(d, title="ang")
    _labelled(ax, "ang")
    assert ax.collections[0].get_array().count() == sum(n_layers - n + 1 for n in range(1, 4))
    assert len(ax.get_lines()) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    assert not math.isnan(float(ax.collections[0].get_array().max()))


# ------------------------------------------------ removal curves and speed-ups


def _curves():
    rows = []
    for metric, slope in (("bi", 1.2), ("random", 2.0)):
        for k in range(4):
            ppl = 10 * slope**k
            acc = 0.7 - 0.03 * k * slope
            rows.append({"metric": metric, "k": k, "ppl": ppl, "ppl_ci_low": ppl * 0.9,
                         "ppl_ci_high": ppl * 1.1, "seq_len": 256, "acc": acc,
                         "acc_ci_low": acc - 0.08, "acc_ci_high": acc + 0.08, "chance": 0.5})
    return pd.DataFrame(rows)


def test_removal_curves_ppl_and_accuracy():
    ax = removal_curves(_curves(), "ppl")
    assert ax.get_title() and "256 tokens" in ax.get_ylabel() and ax.get_xlabel()
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # one band per metric
    ax = removal_curves(_curves(), "acc", title="PIQA")
    assert ax.get_title() == "PIQA" and ax.get_yscale() == "linear"
    assert any(line.get_linestyle() == "--" for line in ax.lines)  # chance
    with pytest.raises(ValueError, match="no column"):
        removal_curves(_curves(), "bleu")
    plt.close("all")


def test_speedup_plot_ratios_against_ideal():
    df = pd.DataFrame({"k": [0, 2, 4], "prefill_seconds": [1.0, 0.9, 0.8],
                       "decode_tokens_per_s": [10.0, 11.0, 12.5],
                       "peak_memory_bytes": [100.0, 95.0, 90.0]})
    ax = speedup_plot(df, num_layers=10)
    assert ax.get_title() and "×" in ax.get_ylabel() and ax.get_xlabel()
    lines = {line.get_label(): line for line in ax.lines}
    assert lines["decode speed-up"].get_ydata()[-1] == pytest.approx(1.25)
    assert lines["prefill speed-up"].get_ydata()[-1] == pytest.approx(1.25)
    assert lines["ideal L/(L−k), L = 10"].get_ydata()[-1] == pytest.approx(10 / 6)
    with pytest.raises(ValueError, match="k = 0"):
        speedup_plot(df[df["k"] > 0], num_layers=10)
    plt.close("all")


def test_pareto_plot_joins_only_the_points_nothing_beats():
    table = pd.DataFrame({"method": ["dense", "a", "b", "c"],
                          "file": [1.0, 0.7, 0.8, 0.6], "ppl": [1.0, 2.0, 3.0, 5.0],
                          "acc": [0.6, 0.5, 0.55, 0.3]})
    table["ppl_lo"], table["ppl_hi"] = table["ppl"] * 0.9, table["ppl"] * 1.1
    table["acc_lo"], table["acc_hi"] = table["acc"] - 0.05, table["acc"] + 0.05
    fig = plots.pareto_plot(table, {"file": "file / dense"},
                            {"ppl": ("ppl x dense", "ppl_lo", "ppl_hi", False),
                             "acc": ("accuracy", "acc_lo", "acc_hi", True)}, title="T")
    ppl_ax, acc_ax = fig.axes[0], fig.axes[1]
    # cheapest first: c (0.6), a (0.7), b (0.8) is beaten by a, dense (1.0)
    assert list(zip(*ppl_ax.lines[-1].get_data())) == [(0.6, 5.0), (0.7, 2.0), (1.0, 1.0)]
    assert list(zip(*acc_ax.lines[-1].get_data())) == [(0.6, 0.3), (0.7, 0.5), (0.8, 0.55),
                                                       (1.0, 0.6)]
    assert ppl_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    assert fig._suptitle.get_text() == "T" and len(fig.legends[0].get_texts()) == 4
