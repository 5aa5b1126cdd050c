"""The shared figures: each returns its Axes, titled and labelled, with one bar or cell per
value. Small synthetic input, no model, a few seconds."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from shortgpt_lite import plots  # noqa: E402


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
