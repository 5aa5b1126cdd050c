"""``prefix``: a sweep of removal plans measured from the shared prefix
(:class:`shortgpt_lite.prefix.SharedPrefix`) against the same plans measured on pruned
copies, each running every block it keeps. Both sides compute the same perplexities;
the table shows what recording the shared states once saves."""

from __future__ import annotations

import math

from ..evaluate import perplexity
from ..importance import layer_importance, layers_to_remove
from ..inputs import input_device
from ..layers import decoder_layers
from ..prefix import SharedPrefix, first_removed
from ..provenance import machine
from ..removal import remove_layers
from .common import benchmark, interleaved_times, model_and_windows, print_times


@benchmark("prefix", "removal plans k = 1 .. L/3 of Block Influence: perplexity from the shared "
                     "prefix vs on pruned copies")
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
        prefix = SharedPrefix(model, first_removed(plans))
        with prefix.recording():
            perplexity(model, windows, batch, progress=False)
        out = []
        for p in plans:
            with prefix.removed(p):
                out.append(perplexity(model, windows, batch, progress=False)["nll"])
        results["shared"] = out

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
