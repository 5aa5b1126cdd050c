"""``cost``: what :func:`shortgpt_lite.costs.cost` reports for one model: parameters,
safetensors size, peak memory, prefill latency and decode speed."""

from __future__ import annotations

from ..costs import cost
from ..models import load_model
from ..provenance import machine
from .common import benchmark


@benchmark("cost", "cost(): parameters, safetensors size, peak memory, prefill and decode speed")
def bench_cost(args) -> None:
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    result = cost(model, seq_len=args.seq_len, repeats=args.repeats)
    print(f"machine: {machine()}")
    print(f"model: {args.model}")
    for key, value in result.items():
        print(f"  {key:<22} {value:,.3f}" if isinstance(value, float)
              else f"  {key:<22} {value:,}" if isinstance(value, int) else
              f"  {key:<22} {value}")
