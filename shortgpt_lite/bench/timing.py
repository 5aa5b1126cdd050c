"""``timing``: does the timer treat models of equal compute alike? Four models are timed in
one process under two protocols. ``one after another`` times each model's repeats back to
back after a warm-up, in a fixed order, and reports the median; ``interleaved``
(:func:`shortgpt_lite.costs.speed_runs`) warms every model up first, alternates the order
of each repeat, and reports the fastest run. A copy of the dense model and the same model
with half its block weights zeroed by Wanda do exactly the dense model's computation on a
dense CPU kernel, so a fair timer puts both at 1.00 of it; layer removal does less."""

from __future__ import annotations

import copy

import pandas as pd

from ..costs import speed_runs, summarise_speeds
from ..importance import layer_importance, layers_to_remove
from ..layers import decoder_layers
from ..provenance import machine
from ..removal import remove_layers
from ..wanda import wanda_prune
from .common import benchmark, model_and_windows

DECODE_TOKENS = 32


def one_after_another(models: dict, seq_len: int, repeats: int) -> pd.DataFrame:
    """Each model in turn, warmed up, then its ``repeats`` runs back to back; the median of
    each. Whatever drifts during the run (clock speed, other processes, caches) falls on the
    models unequally."""
    runs = pd.concat([speed_runs({name: m}, seq_len, DECODE_TOKENS, repeats)
                      for name, m in models.items()])
    return runs.groupby("model", sort=False)[["prefill_seconds", "decode_tokens_per_s"]].median()


@benchmark("timing", "equal-compute models under two timing protocols: one after another "
                     "(median) against interleaved with warm-up (fastest run)")
def bench_timing(args) -> None:
    model, _, windows = model_and_windows(args, "calibration", 4 * 256)
    scores = layer_importance(model, windows, "bi", progress=False)
    k = round(9 / 32 * len(decoder_layers(model)))
    models = {"dense": model, "dense, a copy": copy.deepcopy(model),
              "Wanda 50%": wanda_prune(model, windows, 0.5, progress=False),
              f"ShortGPT, {k} layers removed": remove_layers(model, layers_to_remove(scores, k))}
    seq_len = args.seq_len
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}; prefill of {seq_len} tokens and {DECODE_TOKENS} "
          f"decode steps at batch 1, {args.repeats} repeats per protocol")
    tables = {"one after another, median": one_after_another(models, seq_len, args.repeats),
              "interleaved, fastest": summarise_speeds(
                  speed_runs(models, seq_len, DECODE_TOKENS, args.repeats))}
    print(f"{'protocol':<26} {'model':<30} {'prefill s':>9} {'x dense':>8} {'decode tok/s':>12} "
          f"{'x dense':>8}")
    for protocol, t in tables.items():
        dense = t.loc["dense"]
        for name, r in t.iterrows():
            print(f"{protocol:<26} {name:<30} {r['prefill_seconds']:>9.3f} "
                  f"{dense['prefill_seconds'] / r['prefill_seconds']:>8.2f} "
                  f"{r['decode_tokens_per_s']:>12.1f} "
                  f"{r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:>8.2f}")
    spread = tables["interleaved, fastest"][["prefill_spread", "decode_spread"]]
    print("interleaved spread, (slowest - fastest) / fastest:")
    print(spread.map(lambda x: f"{x:.1%}").to_string())
