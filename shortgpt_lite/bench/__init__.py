"""Benchmarks: ``python -m shortgpt_lite.bench NAME``.

Each benchmark measures the real thing side by side in one process and prints a table
that can be pasted into the README together with the machine it ran on.
"""

from ..provenance import machine
from . import bi, context, cost, distributed, eval, gen, heal, load, prefix, stream, timing, wanda  # noqa: F401 (each registers its benchmark)
from .common import BENCHES, benchmark

__all__ = ["BENCHES", "benchmark", "machine"]
