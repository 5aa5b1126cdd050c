"""``load``: how long ``load_model`` takes from a warm cache, each load in a fresh process
(so nothing is cached in memory), with the time of ``import shortgpt_lite`` apart."""

from __future__ import annotations

import statistics
import subprocess
import sys

from ..models import load_model
from ..provenance import machine
from .common import benchmark

_SNIPPET = """
import time, sys
t0 = time.perf_counter()
from shortgpt_lite import load_model
t1 = time.perf_counter()
load_model(sys.argv[1], device=sys.argv[2])
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


@benchmark("load", "time load_model from a warm cache, each load in a fresh process")
def bench_load(args) -> None:
    load_model(args.model, device=args.device)  # builds the cache if it is missing
    imports, loads = [], []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _SNIPPET, args.model, args.device],
                             check=True, capture_output=True, text=True).stdout.split()
        imports.append(float(out[-2]))
        loads.append(float(out[-1]))
    print(f"machine: {machine()}")
    print(f"load_model({args.model!r}), warm cache, fresh process, {args.repeats} runs:")
    print(f"  load_model call       median {statistics.median(loads):.2f} s "
          f"(min {min(loads):.2f}, max {max(loads):.2f})")
    print(f"  + import shortgpt_lite median {statistics.median(imports):.2f} s")
