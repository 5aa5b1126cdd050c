"""removal_curves and speedup_plot on synthetic frames: titled, labelled, bands drawn."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from shortgpt_lite import removal_curves, speedup_plot  # noqa: E402


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
