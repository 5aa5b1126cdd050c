"""``gen``: ShortGPT-gen against plain removal and the dense model: time to first token
and decode speed (:func:`shortgpt_lite.costs.speed_runs`, interleaved), and LAMBADA's last
word decoded token by token with a KV cache (:func:`shortgpt_lite.evaluate.decoded_accuracy`),
with paired intervals over the items.

The plan is Block Influence's at the paper's share of layers (9 of 32). ShortGPT-gen runs
twice: as the authors' code does, with the skipped layers' prompt keys cached without
rotary position embedding, and with them rotated."""

from __future__ import annotations

import pandas as pd

from ..costs import speed_runs, summarise_speeds
from ..data import load_benchmark
from ..evaluate import decoded_accuracy
from ..experiments import paired_difference
from ..generation import shortgpt_gen
from ..importance import layer_importance, layers_to_remove
from ..layers import decoder_layers
from ..provenance import machine
from ..removal import remove_layers
from .common import benchmark, model_and_windows


@benchmark("gen", "ShortGPT-gen (prompt skips the removed layers, decoding runs them) against "
                  "removal and dense: time to first token, decode speed, decoded LAMBADA")
def bench_gen(args) -> None:
    model, tokenizer, windows = model_and_windows(args, "calibration", 16384)
    n = len(decoder_layers(model))
    scores = layer_importance(model, windows, "bi", progress=False)
    plan = layers_to_remove(scores, round(n * 9 / 32))
    models = {"dense": model, "removed": remove_layers(model, plan),
              "shortgpt-gen": shortgpt_gen(model, plan),
              "shortgpt-gen, rotated keys": shortgpt_gen(model, plan, rotate_prompt_keys=True)}
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}; {len(plan)} of {n} layers by BI on "
          f"{windows.numel()} tokens: {plan}")
    speeds = summarise_speeds(speed_runs(models, seq_len=args.seq_len, repeats=args.repeats))
    items = load_benchmark("lambada", 500, seed=0)
    acc = {name: decoded_accuracy(m, tokenizer, items, progress=False)
           for name, m in models.items()}
    print(f"prompt of {args.seq_len} tokens, 32 decoded tokens, {args.repeats} interleaved "
          f"repeats, the fastest of each; LAMBADA decoded on {len(items)} items, paired "
          "95% intervals against removal")
    rows = []
    for name in models:
        r = acc[name]
        d = paired_difference(pd.Series(r["correct"], dtype=float),
                              pd.Series(acc["removed"]["correct"], dtype=float))
        rows.append({"model": name,
                     "prefill s": round(speeds.loc[name, "prefill_seconds"], 4),
                     "decode tok/s": round(speeds.loc[name, "decode_tokens_per_s"], 1),
                     "LAMBADA acc": f"{r['acc']:.3f} [{r['acc_ci_low']:.3f}, {r['acc_ci_high']:.3f}]",
                     "first token": f"{r['first_token_acc']:.3f}",
                     "acc - removed": f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"})
    with pd.option_context("display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))
