"""``prefix``: a sweep of removal plans measured from the shared prefixes, each plan
starting from the deepest state it shares with the unpruned model or an earlier plan
(:class:`shortgpt_lite.prefix.SharedPrefix`), against the same plans measured on pruned
copies, each running every block it keeps. Both sides compute the same perplexities;
the table shows what recording the shared states once saves."""

from __future__ import annotations

import math

from ..evaluate import perplexity
from ..importance import layer_importance, layers_to_remove
from ..inputs import input_device
from ..layers import decoder_layers
from ..prefix import SharedPrefix, first_removed, sweep_order
from ..provenance import machine
from ..removal import remove_layers
from .common import benchmark, interleaved_times, model_and_windows, print_times


@benchmark("prefix", "removal plans k = 1 .. L/3 of Block Influence and the skip-one ppl metric: "
                     "from the shared prefix vs full passes")
def bench_prefix(args) -> None:
    model, tokenizer, windows = model_and_windows(args, "evaluation", 4096)
    device = input_device(model)
    n = len(decoder_layers(model))
    scores = layer_importance(model, windows, "bi", progress=False)
    plans = [layers_to_remove(scores, k) for k in range(1, n // 3 + 1)]
    batch = args.batch_size or perplexity(model, windows, progress=False)["batch_size"]
    results = {}

    def copies():
        results["copies"] = [perplexity(remove_layers(model, p), windows, batch,
                                        progress=False)["nll"] for p in plans]

    def shared():
        order, starts = sweep_order(plans)
        prefix = SharedPrefix(model, starts)
        with prefix.recording():
            perplexity(model, windows, batch, progress=False)
        nll = {}
        for p in order:
            with prefix.removed(p, record=True):
                nll[tuple(p)] = perplexity(model, windows, batch, progress=False)["nll"]
        results["shared"] = [nll[tuple(sorted(p))] for p in plans]

    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; {len(plans)} Block Influence plans "
          f"(k = 1 .. {len(plans)}), first removed blocks {sorted(first_removed(plans))}; "
          f"{args.repeats} interleaved repeats after a warm-up")
    print(f"perplexity of each plan on {windows.numel()} tokens = {len(windows)} windows of "
          f"{args.seq_len}, batch {batch}; the shared side includes its recording pass")
    print_times(interleaved_times({"pruned copies": copies, "shared prefix": shared},
                                  args.repeats, device), windows.numel() * len(plans))
    worst = max(abs(a - b) for a, b in zip(results["copies"], results["shared"]))
    print(f"largest difference in mean NLL between the two: {worst:.2g} nats "
          f"(perplexities {', '.join(f'{math.exp(x):.4g}' for x in results['shared'])})")

    calibration = windows[: max(1, len(windows) // 2)]
    scores = {}

    def skip_one(share):
        def run():
            scores[share] = layer_importance(model, calibration, "ppl", batch_size=batch,
                                             progress=False, share_prefix=share)
        return run

    print(f"\nthe ppl metric (perplexity with each of the {n} layers skipped) on "
          f"{calibration.numel()} tokens")
    print_times(interleaved_times({"every skip in full": skip_one(False),
                                   "from the shared prefix": skip_one(True)},
                                  args.repeats, device), calibration.numel() * n)
    print(f"largest difference between the two sets of scores: "
          f"{float((scores[True] - scores[False]).abs().max()):.2g}")
