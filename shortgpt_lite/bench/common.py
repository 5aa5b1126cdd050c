"""What every benchmark shares: the registry, the one-line machine description, and the
timing of several approaches side by side."""

from __future__ import annotations

import statistics

from ..costs import timed
from ..data import load_text, token_windows
from ..models import load_model

BENCHES: dict = {}


def benchmark(name: str, help: str):
    """Register a benchmark function ``f(args) -> None`` under ``name``."""

    def register(f):
        BENCHES[name] = (f, help)
        return f

    return register


def model_and_windows(args, split: str, default_tokens: int):
    """The model of ``--model/--device/--dtype``, its tokenizer, and ``--tokens`` (else
    ``default_tokens``) of Wikipedia's ``split`` half in windows of ``--seq-len``."""
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    windows = token_windows(tokenizer, load_text("wikipedia", split), args.seq_len,
                            max_windows=max(1, (args.tokens or default_tokens) // args.seq_len))
    return model, tokenizer, windows


def interleaved_times(runs: dict, repeats: int, device) -> dict:
    """``{name: [seconds per repeat]}`` for each ``runs[name]()``, after one warm-up of
    each. Interleaving spreads any slowdown from other processes over all approaches alike."""
    for f in runs.values():
        f()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, f in runs.items():
            times[name].append(timed(f, device))
    return times


def print_times(times: dict, tokens: int, first: str = "bare") -> None:
    """A table of median and fastest times, throughput, and speed relative to the first
    approach, headed ``x <first>`` (the bare one, unless named otherwise)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    base = next(iter(times))
    relative = f"x {first}"
    print(f"{'approach':<34} {'median s':>9} {'tokens/s':>9} {relative:>7} {'min s':>7} "
          f"{relative:>7}")
    for name in times:
        print(f"{name:<34} {med[name]:>9.2f} {tokens / med[name]:>9.0f} "
              f"{med[base] / med[name]:>7.3f} {best[name]:>7.2f} {best[base] / best[name]:>7.3f}")
