"""Claims the book's prose makes about a chapter's outputs, checked where they are made.

A chapter's numbers can differ in their last digits from one CPU to another (other
kernels round differently), and a near-tie can then flip: two layers swap places in a
plan, a pruning mask moves whole weights. Comparing such outputs digit by digit tests
one machine, not the text. So a cell whose printed numbers depend on the last bits is
left out of nbval's comparison, and a hidden cell after it checks what the prose says of
it instead, for example "Wanda beats magnitude at every pattern"::

    sgl.claim((gap["Wanda"] < gap["magnitude"]).all(), "Wanda beats magnitude at every pattern")

The prose describes the chapter's default run. When the book is validated or built
(``SHORTGPT_LITE_CLAIMS=strict``, which ``make test`` and ``make book`` set), a claim that
does not hold raises, so text and output cannot drift apart. In any other run, a papermill
rerun on another model or a Colab session with other parameters, it only warns: the claim
was made about the default run, and a reader needs to know it does not carry over.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["ClaimNotHeld", "claim", "strict_claims"]

STRICT_ENV = "SHORTGPT_LITE_CLAIMS"


class ClaimNotHeld(UserWarning):
    """A claim of the book's text does not hold for this run's outputs."""


def strict_claims() -> bool:
    """True when a failed claim must raise: ``SHORTGPT_LITE_CLAIMS=strict``."""
    return os.environ.get(STRICT_ENV, "").strip().lower() == "strict"


def claim(holds, text: str, detail: str = "") -> None:
    """Check one claim of the text; ``holds`` is anything ``bool()`` accepts.

    If it does not hold, raises ``AssertionError`` in strict mode and warns with
    :class:`ClaimNotHeld` otherwise; ``detail`` (the numbers behind it) goes into the
    message. Returns nothing, so a check cell that ends with a claim displays nothing.
    """
    if not bool(holds):
        message = f"The text claims: {text}. This run's outputs disagree"
        message += f" ({detail})." if detail else "."
        if strict_claims():
            raise AssertionError(message)
        warnings.warn(message + " The text describes the chapter's default parameters.",
                      ClaimNotHeld, stacklevel=2)
