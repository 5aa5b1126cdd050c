"""``wanda``: the time of ``wanda_prune`` against the forward passes its calibration
makes (the inputs of block 0, then every block twice) without hooks, scores or masks,
and against one plain forward pass over the same tokens."""

from __future__ import annotations

import copy
import statistics
from functools import partial

import torch

from ..costs import timed
from ..inputs import input_device
from ..layers import decoder_layers
from ..provenance import machine
from ..wanda import block_inputs, run_block, sparsity_report, wanda_prune
from .common import benchmark, model_and_windows


def wanda_passes(model, windows, batch_size: int) -> None:
    """The forward passes Wanda's calibration makes, without hooks, scores or masks: the
    inputs of block 0, then every block twice (statistics, pruned outputs)."""
    with torch.inference_mode():
        hidden, calls, tuple_output = block_inputs(model, windows, batch_size)
        blocks = decoder_layers(model)
        for b, block in enumerate(blocks):
            run_block(block, hidden, calls[b], tuple_output)
            if b < len(blocks) - 1:
                hidden = run_block(block, hidden, calls[b], tuple_output)


@benchmark("wanda", "Wanda's time against the calibration forward passes alone "
                    "(default 64 x 512 tokens; --repeats timed runs of each)")
def bench_wanda(args) -> None:
    model, _, windows = model_and_windows(args, "calibration", 64 * 512)
    device = input_device(model)
    batch_size = args.batch_size or 8

    def plain_forward():
        with torch.inference_mode():
            for s in range(0, len(windows), batch_size):
                model(windows[s:s + batch_size].to(device), use_cache=False)

    names = ["plain forward (one full pass, logits included)",
             "Wanda's block passes (2 per block), no scoring",
             "wanda_prune(sparsity=0.5)"]
    times: dict = {name: [] for name in names}
    pruned = None
    for _ in range(args.repeats):
        times[names[0]].append(timed(plain_forward, device))
        times[names[1]].append(timed(partial(wanda_passes, model, windows, batch_size), device))
        pruned = copy.deepcopy(model)  # not timed; pruned in place below
        times[names[2]].append(timed(partial(wanda_prune, pruned, windows, 0.5,
                                             batch_size=batch_size, inplace=True,
                                             progress=False), device))
    median = {name: statistics.median(t) for name, t in times.items()}
    achieved = sparsity_report(pruned)
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; calibration {windows.numel()} tokens "
          f"= {len(windows)} windows of {windows.shape[1]}, batch {batch_size}; median of "
          f"{args.repeats} run(s)")
    print(f"{'approach':<50} {'median s':>9} {'Wanda / this':>13}")
    for name in names:
        print(f"{name:<50} {median[name]:>9.1f} {median[names[2]] / median[name]:>13.2f}")
    print(f"achieved sparsity of the block linears: "
          f"{achieved['zeros'].sum() / achieved['params'].sum():.4f} "
          f"(per layer {achieved['sparsity'].min():.4f} .. {achieved['sparsity'].max():.4f})")
    print("target: Wanda under 2x the calibration forward passes alone")
