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

# A mix of prompt shapes: short two-way (PIQA), long four-way (HellaSwag), short four-way
# (ARC), one-token answers sharing one row (BoolQ, MMLU).
_EVAL_MIX = {"piqa": 30, "hellaswag": 15, "arc_easy": 15, "boolq": 8, "mmlu": 8}


def _timed(f, device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    f()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _interleaved_medians(runs: dict, repeats: int, device) -> dict:
    import statistics

    for f in runs.values():  # warm-up
        f()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, f in runs.items():
            times[name].append(_timed(f, device))
    return {name: statistics.median(t) for name, t in times.items()}


@benchmark("eval", "perplexity and multiple-choice scoring vs bare forward passes of the same "
                   "batches (token throughput)")
def bench_eval(args) -> None:
    from . import evaluate as ev
    from .data import load_benchmark, load_text, token_windows
    from .models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = model.get_input_embeddings().weight.device
    tokens = args.tokens or 4096
    windows = token_windows(tokenizer, load_text("wikipedia", "evaluation"), args.seq_len,
                            max_windows=max(1, tokens // args.seq_len))
    ppl_batch = args.batch_size or ev._default_ppl_batch(model, args.seq_len)
    choice_batch = args.batch_size or 16
    items = [it for name, n in _EVAL_MIX.items() for it in load_benchmark(name, n, seed=0)]
    requests = [r for it in items for r in it.requests]
    batches = ev._plan_batches(model, tokenizer, requests, choice_batch)
    real = sum(int(ids.numel() if m is None else m.sum()) for ids, m, *_ in batches)
    padded = sum(ids.numel() for ids, *_ in batches)

    def forward_windows():
        with torch.inference_mode():
            for start in range(0, len(windows), ppl_batch):
                model(windows[start:start + ppl_batch].to(device), use_cache=False)

    def forward_batches(keep):
        with torch.inference_mode():
            for ids, mask, pos, *_ in batches:
                model(ids.to(device), attention_mask=None if mask is None else mask.to(device),
                      position_ids=None if pos is None else pos.to(device), use_cache=False,
                      logits_to_keep=keep)

    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; median of {args.repeats} "
          "interleaved repeats after a warm-up")
    ppl = _interleaved_medians({
        "bare forward": forward_windows,
        "perplexity()": lambda: ev.perplexity(model, windows, ppl_batch, progress=False),
    }, args.repeats, device)
    print(f"\nperplexity: {windows.numel()} tokens = {len(windows)} windows of {args.seq_len}, "
          f"batch {ppl_batch}")
    print(f"{'approach':<34} {'median s':>9} {'tokens/s':>9} {'x bare':>7}")
    for name, t in ppl.items():
        print(f"{name:<34} {t:>9.2f} {windows.numel() / t:>9.0f} "
              f"{ppl['bare forward'] / t:>7.3f}")

    mc = _interleaved_medians({
        "bare forward, all logits": lambda: forward_batches(0),
        "bare forward, last logit only": lambda: forward_batches(1),
        "loglikelihoods() incl. tokenising": lambda: ev.loglikelihoods(
            model, tokenizer, requests, choice_batch, progress=False),
    }, args.repeats, device)
    print(f"\nmultiple choice: {len(items)} items ({', '.join(f'{k} {v}' for k, v in _EVAL_MIX.items())}), "
          f"{len(requests)} requests in {sum(len(b[0]) for b in batches)} distinct rows, "
          f"{len(batches)} left-padded batches of up to {choice_batch}; {real} tokens "
          f"({padded} with padding)")
    print(f"{'approach':<34} {'median s':>9} {'tokens/s':>9} {'x bare':>7}")
    for name, t in mc.items():
        print(f"{name:<34} {t:>9.2f} {real / t:>9.0f} "
              f"{mc['bare forward, all logits'] / t:>7.3f}")
    print("tokens/s counts real (non-padding) tokens; 'x bare' is the throughput relative to the "
          "bare forward\npass that computes logits at every position, as a plain "
          "model(input_ids) call does.")


@benchmark("cost", "cost(): parameters, safetensors size, peak memory, prefill and decode speed")
def bench_cost(args) -> None:
    from .evaluate import cost
    from .models import load_model

    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    result = cost(model, seq_len=args.seq_len, repeats=args.repeats)
    print(f"machine: {machine()}")
    print(f"model: {args.model}")
    for key, value in result.items():
        print(f"  {key:<22} {value:,.3f}" if isinstance(value, float)
              else f"  {key:<22} {value:,}" if isinstance(value, int) else
              f"  {key:<22} {value}")


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
