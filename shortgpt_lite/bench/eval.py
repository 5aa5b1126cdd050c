"""``eval``: the token throughput of ``perplexity`` and of multiple-choice scoring
(``loglikelihoods``), each against bare forward passes over the very same batches, so
the table shows what the scoring around the model costs; and the time of scoring the
same requests with a shared context packed into one row against one row per request, and
with the output head on the scored positions against the head on every kept one."""

from __future__ import annotations

import torch

from ..data import load_benchmark
from ..evaluate import loglikelihoods, perplexity, plan_batches
from ..inputs import input_device
from ..provenance import machine
from .common import benchmark, interleaved_times, model_and_windows, print_times

# A mix of prompt shapes: short two-way (PIQA), long four-way (HellaSwag), short four-way
# (ARC), one-token answers sharing one row (BoolQ, MMLU).
MIX = {"piqa": 16, "hellaswag": 8, "arc_easy": 8, "boolq": 4, "mmlu": 4}


@benchmark("eval", "perplexity and multiple-choice scoring vs bare forward passes of the same "
                   "batches (token throughput)")
def bench_eval(args) -> None:
    model, tokenizer, windows = model_and_windows(args, "evaluation", 2048)
    device = input_device(model)
    # perplexity() picks its own batch size when none is given; this first call tells which
    ppl_batch = args.batch_size or perplexity(model, windows, progress=False)["batch_size"]
    choice_batch = args.batch_size or 16
    items = [it for name, n in MIX.items() for it in load_benchmark(name, n, seed=0)]
    requests = [r for it in items for r in it.requests]
    # the left-padded batches loglikelihoods() runs, planned the same way
    batches = plan_batches(model, tokenizer, requests, choice_batch)
    real = sum(b.tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)
    unshared = sum(b.tokens for b in plan_batches(model, tokenizer, requests, choice_batch,
                                                  share_context=False))

    def forward_windows():
        with torch.inference_mode():
            for start in range(0, len(windows), ppl_batch):
                model(windows[start:start + ppl_batch].to(device), use_cache=False)

    def forward_batches():
        with torch.inference_mode():
            for ids, mask, pos, *_ in batches:
                model(ids.to(device), attention_mask=None if mask is None else mask.to(device),
                      position_ids=None if pos is None else pos.to(device), use_cache=False)

    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; {args.repeats} interleaved repeats "
          "after a warm-up")
    print(f"\nperplexity: {windows.numel()} tokens = {len(windows)} windows of {args.seq_len}, "
          f"batch {ppl_batch}")
    print_times(interleaved_times({
        "bare forward": forward_windows,
        "perplexity()": lambda: perplexity(model, windows, ppl_batch, progress=False),
    }, args.repeats, device), windows.numel())

    mix = ", ".join(f"{k} {v}" for k, v in MIX.items())
    print(f"\nmultiple choice: {len(items)} items ({mix}), {len(requests)} requests in "
          f"{sum(len(b.rows) for b in batches)} rows (choices of one context packed into one), "
          f"{len(batches)} left-padded batches of up to {choice_batch}; {real} tokens "
          f"({padded} with padding; {unshared} with one row per request)")
    print_times(interleaved_times({
        "bare forward (all logits)": forward_batches,
        "loglikelihoods() incl. tokenising": lambda: loglikelihoods(
            model, tokenizer, requests, choice_batch, progress=False),
        "loglikelihoods(share_context=False)": lambda: loglikelihoods(
            model, tokenizer, requests, choice_batch, progress=False, share_context=False),
        "loglikelihoods(), head at every kept position": lambda: loglikelihoods(
            model, tokenizer, requests, choice_batch, progress=False, head_at_scored=False),
    }, args.repeats, device), real)
    print("tokens/s counts the real (non-padding) tokens of the packed rows for every line, so "
          "its ratios are\nratios of time. 'bare forward' is model(input_ids) on the same "
          "batches, with logits at every\nposition; loglikelihoods() runs the head on the "
          "positions each row scores, and its\n'head at every kept position' line on the last "
          "positions of every row, as many as the\nrow that scores the most.")
