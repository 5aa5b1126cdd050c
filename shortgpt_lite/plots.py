"""The seaborn figures the chapters share.

Every figure has a title and labelled axes with units, is readable at the width of a
book page, and is rendered as PNG (nbval does not compare PNGs, and the book stays
small). A chapter calls :func:`book_style` once, then the plotting functions below,
each of which returns its matplotlib ``Axes`` or ``Figure`` so a reader can adjust it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

__all__ = ["book_style"]


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
