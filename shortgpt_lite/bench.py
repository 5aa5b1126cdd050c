"""Benchmarks: ``python -m shortgpt_lite.bench NAME``.

Each benchmark measures the real thing side by side in one process and prints a table
that can be pasted into the README together with the machine it ran on.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

BENCHMARKS: dict = {}


def benchmark(name: str, help: str):
    """Register a benchmark function ``f(args) -> None`` under ``name``."""

    def register(f):
        BENCHMARKS[name] = (f, help)
        return f

    return register


def machine() -> str:
    """One line naming the machine, for the README next to the figures."""
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


@benchmark("load", "time load_model with a warm cache (the README's load time)")
def bench_load(args) -> None:
    from .models import load_model

    load_model(args.model)  # builds the cache if it is missing
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        load_model(args.model)
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"machine: {machine()}")
    print(f"load_model({args.model!r}) with a warm cache: median {times[len(times) // 2]:.2f} s "
          f"(min {times[0]:.2f} s, max {times[-1]:.2f} s, {args.repeats} loads)")


# Block Influence benchmarks

# Evaluation benchmarks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shortgpt_lite.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=None,
                        help="calibration or evaluation tokens (each benchmark has its default)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--shapes", default=None,
                        help="random-weight model with a known shape, e.g. 'llama-2-7b'")
    args = parser.parse_args(argv)
    BENCHMARKS[args.name][0](args)


if __name__ == "__main__":
    main()
