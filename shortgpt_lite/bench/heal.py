"""``heal``: the cost of a healing step of each recipe against a plain forward and
backward pass of the pruned model on the same tokens.

Each recipe is timed as ``heal(..., steps=N)`` and ``heal(..., steps=2N)``, interleaved
with the plain passes; the difference of the two is N steps, without the setup (the
copy of the model, the adapters and their merge, the teacher's states for ``bridge``),
which is shown on its own. The plain pass, timed the same way, is the language-modelling
loss of a copy of the pruned model, ``backward`` into every weight, and an AdamW step.
Each step is one batch of ``--batch-size`` (default 4) windows of ``--seq-len`` tokens
(``heal``'s command line trains on windows of 256)."""

from __future__ import annotations

import statistics

import torch

from ..healing import METHODS, heal, lm_loss
from ..importance import layer_importance, layers_to_remove
from ..inputs import input_device
from ..layers import decoder_layers
from ..provenance import machine
from ..removal import remove_layers
from .common import benchmark, interleaved_times, model_and_windows

_STEPS = 3


@benchmark("heal", "tokens per second of a healing step of each recipe against a plain "
                   "forward and backward pass on the same tokens")
def bench_heal(args) -> None:
    batch = args.batch_size or 4
    model, _, windows = model_and_windows(args, "calibration", 2 * _STEPS * batch * args.seq_len)
    device = input_device(model)
    n = len(decoder_layers(model))
    scores = layer_importance(model, windows, "bi", progress=False)
    plan = layers_to_remove(scores, round(n * 9 / 32))  # the paper's share
    pruned = remove_layers(model, plan, scores=scores, metric="bi")
    tokens = _STEPS * batch * windows.shape[1]

    def plain(steps):
        def run():
            m = remove_layers(model, plan).train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
            for s in range(steps):
                i = s % (len(windows) // batch)
                loss = lm_loss(m, windows[i * batch:(i + 1) * batch].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return run

    def recipe(method, steps):
        return lambda: heal(pruned, windows, teacher=model, method=method, steps=steps,
                            batch_size=batch, progress=False)

    runs = {}
    for method in ("plain",) + METHODS:
        if method == "plain":
            runs[f"plain x{_STEPS}"], runs[f"plain x{2 * _STEPS}"] = plain(_STEPS), plain(2 * _STEPS)
            continue
        runs[f"{method} x{_STEPS}"] = recipe(method, _STEPS)
        runs[f"{method} x{2 * _STEPS}"] = recipe(method, 2 * _STEPS)
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; {len(plan)} of {n} blocks removed "
          f"by BI {plan}; steps of {batch} windows of {windows.shape[1]} tokens; "
          f"{args.repeats} interleaved repeats after a warm-up; medians")
    times = interleaved_times(runs, args.repeats, device)
    per_step, setup = {}, {}
    for method in ("plain",) + METHODS:
        one = statistics.median(times[f"{method} x{_STEPS}"])
        two = statistics.median(times[f"{method} x{2 * _STEPS}"])
        per_step[method] = (two - one) / _STEPS
        setup[method] = one - _STEPS * per_step[method]
    print(f"{'approach':<24} {'s/step':>7} {'tokens/s':>9} {'x plain':>8} {'setup s':>8}")
    for method, step in per_step.items():
        name = "plain forward+backward" if method == "plain" else method
        print(f"{name:<24} {step:>7.2f} {tokens / _STEPS / step:>9.0f} "
              f"{per_step['plain'] / step:>8.2f} {setup[method]:>8.1f}")
