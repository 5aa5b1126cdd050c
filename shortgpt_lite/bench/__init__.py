"""Benchmarks: ``python -m shortgpt_lite.bench NAME``.

Each benchmark measures the real thing side by side in one process and prints a table
that can be pasted into the README together with the machine it ran on.
"""

from ..provenance import machine
from . import (  # noqa: F401 (each registers its benchmark)
    bi,
    context,
    cost,
    distributed,
    dtype,
    eval,
    gen,
    heal,
    load,
    prefix,
    stream,
    timing,
    wanda,
)
from .common import BENCHES, benchmark

__all__ = ["BENCHES", "benchmark", "machine"]
