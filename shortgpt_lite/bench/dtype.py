"""``dtype``: the same evaluation in float32 and in a lower precision (bfloat16 unless
``--dtype`` names another) on one device. The two copies hold the same weights; each
perplexity pass and each multiple-choice pass is timed interleaved with the other copy's,
and the last pass of each says what the lower precision changes: the NLL of every window,
paired over the same windows, and the items whose answer moves."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..data import load_benchmark
from ..evaluate import bootstrap_interval, perplexity, plan_batches, score_items
from ..inputs import input_device
from ..models import resolve_dtype
from ..provenance import machine
from .common import benchmark, interleaved_times, model_and_windows, print_times

TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy")


def native_bf16(device) -> str:
    """Whether the device computes bfloat16 in its own instructions, which decides whether
    bfloat16 is faster at all on a CPU."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "GPU with bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) \
            else "GPU without bfloat16 (emulated)"
    if kind != "cpu":
        return kind
    units = [name for name, has in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                    ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    return ("CPU with " + " and ".join(units) if units
            else "CPU without bfloat16 instructions (emulated: expect it slower than float32)")


@benchmark("dtype", "float32 against bfloat16 on one device: perplexity and multiple-choice "
                    "time side by side, and the NLL and answers the lower precision moves")
def bench_dtype(args) -> None:
    wanted, args.dtype = args.dtype or "bfloat16", "float32"
    full, tokenizer, windows = model_and_windows(args, "evaluation", 4096)
    device = input_device(full)
    low_dtype = resolve_dtype(wanted, device)
    if low_dtype == torch.float32:
        raise SystemExit("--dtype float32 compares float32 with itself; name a lower precision "
                         "(bfloat16, the default, or float16).")
    low_name = str(low_dtype).removeprefix("torch.")
    models = {"float32": full, low_name: copy.deepcopy(full).to(low_dtype)}
    batch = args.batch_size or 16
    n_items = args.items or 50
    items = [it for task in TASKS for it in load_benchmark(task, n_items, seed=0)]
    last: dict = {}

    def ppl_pass(name):
        def f():
            last[("ppl", name)] = perplexity(models[name], windows, batch, progress=False,
                                             per_window=True)
        return f

    def choice_pass(name):
        def f():
            last[("items", name)] = score_items(models[name], tokenizer, items, batch,
                                                progress=False)
        return f

    print(f"machine: {machine()}; {native_bf16(device)}")
    print(f"model: {args.model} on {device}; the float32 copy and a {low_name} copy of the "
          f"same weights; {args.repeats} interleaved repeats after a warm-up")
    print(f"\nperplexity: {windows.numel()} tokens = {len(windows)} windows of {args.seq_len}, "
          f"batch {batch}")
    print_times(interleaved_times({f"perplexity(), {name}": ppl_pass(name) for name in models},
                                  args.repeats, device), windows.numel(), first="fp32")
    requests = [r for it in items for r in it.requests]
    tokens = sum(b.tokens for b in plan_batches(full, tokenizer, requests, batch))
    print(f"\nmultiple choice: {len(items)} items ({n_items} each of {', '.join(TASKS)}), "
          f"{len(requests)} requests, {tokens} tokens in rows of batch {batch}")
    print_times(interleaved_times({f"score_items(), {name}": choice_pass(name)
                                   for name in models}, args.repeats, device), tokens,
                first="fp32")

    base, other = models
    a, b = last[("ppl", base)], last[("ppl", other)]
    diff = b["nll_per_window"] - a["nll_per_window"]
    lo, hi = bootstrap_interval(diff)
    print(f"\nwhat {other} changes")
    print(f"perplexity: {a['perplexity']:.4f} in {base}, {b['perplexity']:.4f} in {other} "
          f"(x{b['perplexity'] / a['perplexity']:.4f})")
    print(f"NLL per window, {other} - {base}: mean {diff.mean():+.5f} nats, 95% paired "
          f"interval [{lo:+.5f}, {hi:+.5f}], largest |difference| {np.abs(diff).max():.5f}")
    x, y = last[("items", base)], last[("items", other)]
    moved = int((x["pred"] != y["pred"]).sum())
    change = y["correct"].to_numpy(float) - x["correct"].to_numpy(float)
    lo, hi = bootstrap_interval(change)
    print(f"accuracy: {x['correct'].mean():.4f} in {base}, {y['correct'].mean():.4f} in {other}; "
          f"{moved} of {len(items)} answers move; paired difference {change.mean():+.4f} "
          f"[{lo:+.4f}, {hi:+.4f}]")
