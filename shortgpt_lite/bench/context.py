"""``context``: physical removal of MLP neurons against zero-masking them at the same
sparsity, in prefill latency and decode speed at batch 1."""

from __future__ import annotations

from ..context import context_plan, context_prune, context_statistics, domain_windows
from ..costs import speed_runs, summarise_speeds
from ..inputs import input_device
from ..models import load_model
from ..provenance import machine
from .common import benchmark

DECODE_TOKENS = 32


@benchmark("context", "physical removal of MLP neurons vs zero-masking at the same sparsity: "
                      "prefill latency and decode speed")
def bench_context(args) -> None:
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = input_device(model)
    windows = domain_windows(tokenizer, "law", 512, max(1, (args.tokens or 4 * 512) // 512))
    stats = context_statistics(model, windows, domain="law", progress=False)
    seq_len = args.seq_len
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; statistics from {windows.numel()} "
          f"law tokens; prefill of {seq_len} tokens and {DECODE_TOKENS} decode steps at batch 1, "
          f"fastest of {args.repeats} interleaved repeats")
    print(f"{'MLP neurons pruned':<19} {'model':<10} {'intermediate':>12} {'params (M)':>10} "
          f"{'prefill s':>9} {'decode tok/s':>12} {'prefill speedup':>15} {'decode speedup':>14}")
    for fraction in (0.0, 0.25, 0.5):
        plan = context_plan(stats, fraction=fraction, linear=False, embeddings=False)
        models = {"zero-mask": context_prune(model, plan, progress=False),
                  "physical": context_prune(model, plan, physical=True, progress=False)}
        speed = summarise_speeds(speed_runs(models, seq_len, DECODE_TOKENS, args.repeats))
        prefill, tps = speed["prefill_seconds"], speed["decode_tokens_per_s"]
        for name, m in models.items():
            params = sum(p.numel() for p in m.parameters()) / 1e6
            print(f"{fraction:<19.0%} {name:<10} {m.config.intermediate_size:>12} {params:>10.1f} "
                  f"{prefill[name]:>9.3f} {tps[name]:>12.1f} "
                  f"{prefill['zero-mask'] / prefill[name]:>14.2f}x "
                  f"{tps[name] / tps['zero-mask']:>13.2f}x")
        del models
