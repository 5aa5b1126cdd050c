"""What a model costs to store and run: parameters, bytes on disk, peak memory, prefill
latency and decode speed.

Pruning is worth doing only for what it saves, and the methods of this book save
different things: removed layers shrink the file and every forward pass, zeroed weights
(Wanda) shrink neither on dense hardware, int8 shrinks the file. :func:`cost` measures all
of it the same way for any model, and :func:`speed_runs` is the one timer every speed
figure of the library and its benchmarks comes from: models compared are timed together,
warmed up first, in an order that alternates, so none is favoured by when it runs.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .inputs import cache_keyword, input_device, max_positions, vocab_rows
from .layers import num_layers
from .quantize import is_quantized

__all__ = [
    "PeakMemory",
    "cost",
    "param_breakdown",
    "param_counts",
    "prefill_and_decode",
    "safetensors_bytes",
    "serialized_bytes",
    "speed_runs",
    "summarise_speeds",
    "synchronize",
    "timed",
    "weights_bytes",
]


# ------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a clock read afterwards includes it (a no-op on
    the CPU, whose work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(f: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``f()`` takes, the device's queued work included before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    f()
    synchronize(device)
    return time.perf_counter() - t0


def _speed_probe(model: nn.Module, seq_len: int, decode_tokens: int, seed: int):
    """A function that runs one prefill of a ``seq_len``-token prompt and ``decode_tokens``
    greedy steps on ``model`` and returns (prefill seconds, decode tokens per second)."""
    max_pos = max_positions(model)
    if max_pos is not None and seq_len + decode_tokens > max_pos:
        raise ValueError(f"A {seq_len}-token prompt plus {decode_tokens} decoded tokens needs more "
                         f"than the model's {max_pos} positions; use a shorter seq_len.")
    if decode_tokens < 1:
        raise ValueError("decode_tokens must be at least 1.")
    device = input_device(model)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_rows(model), (1, seq_len), generator=gen).to(device)
    cache = cache_keyword(model)

    def once() -> tuple[float, float]:
        state = {}

        def prefill():
            state["out"] = model(prompt, use_cache=True, logits_to_keep=1)

        def decode():
            out = state["out"]
            for _ in range(decode_tokens):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, use_cache=True, **{cache: out[cache]})

        with torch.inference_mode():
            return timed(prefill, device), decode_tokens / timed(decode, device)

    return once


def speed_runs(models: Mapping[str, nn.Module], seq_len: int = 512, decode_tokens: int = 32,
               repeats: int = 5, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Every timed run of every model, one row each: ``model``, ``repeat``, ``position``
    (its place in that repeat's order), ``prefill_seconds``, ``decode_tokens_per_s``.

    Models are compared fairly only when none of them is favoured by when it runs. Every
    model first runs once untimed (kernels, allocator, thread pool, caches of its own
    weights); then each repeat runs every model once, in an order that alternates, first to
    last and last to first, so warm-up left over and drifting load from other processes
    fall on all of them alike.
    """
    if not models:
        raise ValueError("No models given; pass a dict {name: model}.")
    if repeats < 1:
        raise ValueError("repeats must be at least 1.")
    probes = {name: _speed_probe(m, seq_len, decode_tokens, seed) for name, m in models.items()}
    for probe in probes.values():
        probe()
    names, rows = list(probes), []
    for r in tqdm(range(repeats), desc="timing", unit="repeat", disable=not progress):
        for position, name in enumerate(names if r % 2 == 0 else names[::-1]):
            prefill, tps = probes[name]()
            rows.append({"model": name, "repeat": r, "position": position,
                         "prefill_seconds": prefill, "decode_tokens_per_s": tps})
    return pd.DataFrame(rows)


def summarise_speeds(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per model of :func:`speed_runs`: the fastest run (``prefill_seconds``, the
    minimum; ``decode_tokens_per_s``, the maximum), which is the least disturbed by anything
    else on the machine, and the spread, ``(slowest - fastest) / fastest``, which says how
    disturbed the others were."""
    g = runs.groupby("model", sort=False)
    prefill, decode = g["prefill_seconds"], g["decode_tokens_per_s"]
    return pd.DataFrame({
        "prefill_seconds": prefill.min(),
        "prefill_spread": prefill.max() / prefill.min() - 1,
        "decode_tokens_per_s": decode.max(),
        "decode_spread": decode.max() / decode.min() - 1,
        "timing_repeats": g.size(),
    })


def prefill_and_decode(model: nn.Module, seq_len: int = 512, decode_tokens: int = 32,
                       repeats: int = 5, seed: int = 0) -> dict:
    """Prefill latency and decode speed of one model at batch 1, after one untimed run:
    the fastest of ``repeats`` runs, with the spread (:func:`summarise_speeds`).

    * ``prefill_seconds``: one forward pass over a ``seq_len``-token prompt, filling the
      KV cache and computing the next token's logits (time to first token);
    * ``decode_tokens_per_s``: ``decode_tokens`` greedy steps with that KV cache.

    The prompt is random token ids (seeded): the speed depends on the number of tokens,
    not on which they are. Works for any causal LM, int8-quantized ones included. To
    compare models, time them together with :func:`speed_runs` (or :func:`cost` with a
    dict), never one after the other.
    """
    runs = speed_runs({"model": model}, seq_len, decode_tokens, repeats, seed)
    row = summarise_speeds(runs).iloc[0].to_dict()
    return {**row, "timing_repeats": int(row["timing_repeats"])}


# ----------------------------------------------------------------------------- storage


def param_counts(model: nn.Module) -> tuple[int, int]:
    """``(parameters present, parameters that are not zero)``, tied ones counted once
    (``model.parameters()`` yields a shared tensor once). The second is what Wanda's
    zeros lower; removing layers lowers both."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params))


def param_breakdown(model: nn.Module) -> dict:
    """Where the parameters are: ``embedding`` (the input embedding), ``head`` (the output
    projection, 0 when it is tied to the embedding), ``blocks`` (all decoder blocks),
    ``per_block`` (their mean), ``other`` (final norm and the rest) and ``total``. Depth
    pruning removes only from ``blocks``, so ``(embedding + head) / total`` is the share
    it can never save."""
    from .layers import decoder_layers

    total = param_counts(model)[0]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_n = 0 if head is None or head.weight.data_ptr() == embedding.data_ptr() \
        else head.weight.numel()
    layers = decoder_layers(model)
    blocks = sum(p.numel() for layer in layers for p in layer.parameters())
    return {"embedding": embedding.numel(), "head": head_n, "blocks": blocks,
            "per_block": blocks / len(layers), "other": total - embedding.numel() - head_n - blocks,
            "total": total}


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers in memory, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def safetensors_bytes(model: nn.Module) -> int:
    """Size of the model written as one safetensors file (shared tensors stored once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="shortgpt-lite-size-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model on disk: one safetensors file for a plain model (shared tensors
    stored once), a ``torch.save`` state dict for a quantized one (safetensors cannot
    hold packed int8 weights)."""
    if not is_quantized(model):
        return safetensors_bytes(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# ------------------------------------------------------------------------------ memory


_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Extra memory at peak while the block runs, beyond what was in use when it began.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU (Linux):
    the process's resident-set high-water mark ``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``, minus the resident set at the start. Elsewhere ``extra``
    is NaN. ``start`` is what was in use at the start (allocated CUDA memory, or the
    resident set), ``kind`` says which measure was used::

        with PeakMemory(device) as peak:
            model(ids)
        peak.start + peak.extra  # the peak
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "unavailable"
        self.start = math.nan
        self.extra = math.nan

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated"
        elif self.device.type == "cpu" and os.access(_CLEAR_REFS, os.W_OK):
            _CLEAR_REFS.write_text("5")
            start = _rss("VmRSS")
            if start is not None:
                self.start, self.kind = start, "process peak RSS (VmHWM)"
        return self

    def __exit__(self, *exc):
        if self.kind.startswith("cuda"):
            synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.kind.startswith("process"):
            peak = _rss("VmHWM")
            self.extra = max(0, peak - self.start) if peak is not None else math.nan
        return False


# -------------------------------------------------------------------------------- cost


def _size_and_memory(model, seq_len: int, decode_tokens: int, seed: int) -> dict:
    device = input_device(model)
    with PeakMemory(device) as peak:
        _speed_probe(model, seq_len, decode_tokens, seed)()
    total, nonzero = param_counts(model)
    weights = weights_bytes(model)
    return {
        "layers": num_layers(model),
        "params_total": total,
        "params_nonzero": nonzero,
        "safetensors_bytes": safetensors_bytes(model),
        "weights_bytes": weights,
        "peak_memory_bytes": weights + peak.extra,
        "peak_memory_measure": peak.kind,
        "prefill_tokens": seq_len,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def cost(model, seq_len: int = 512, decode_tokens: int = 32, repeats: int = 5,
         seed: int = 0, progress: bool = False):
    """What a model costs to store and run, measured on the device it is on.

    * ``params_total`` and ``params_nonzero``: :func:`param_counts`;
    * ``safetensors_bytes``: the size of the model written as one safetensors file (it
      is written to a temporary folder and measured); ``weights_bytes``: parameters and
      buffers in memory;
    * ``peak_memory_bytes``: ``weights_bytes`` plus the extra memory at the peak of one
      prefill and decode run. On CUDA the extra is from
      ``torch.cuda.max_memory_allocated``; on a Linux CPU it is the growth of the process's
      peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), which counts
      every allocation including the allocator's slack. ``peak_memory_measure`` says which;
    * ``prefill_seconds``, ``decode_tokens_per_s`` and their spreads: the fastest of
      ``repeats`` runs, all models timed together, interleaved (:func:`speed_runs`).
      ``repeats=0`` times nothing and returns the sizes and memory alone, for models
      whose speed is measured elsewhere or is of no interest.

    ``model`` is one model (returns a dict) or a mapping ``{name: model}`` (returns a
    DataFrame indexed by name, so a dense and a pruned model sit side by side).
    ``progress=True`` shows bars for the sizes and the timing repeats.
    """
    if isinstance(model, Mapping):
        if not model:
            raise ValueError("No models given; pass a model or a dict {name: model}.")
        models = dict(model)
    else:
        models = {"model": model}
    if repeats < 0:
        raise ValueError(f"repeats={repeats}: give the number of timed runs, or 0 to measure "
                         "sizes and memory only.")
    sizes = {name: _size_and_memory(m, seq_len, decode_tokens, seed)
             for name, m in tqdm(models.items(), desc="sizes", disable=not progress)}
    table = pd.DataFrame.from_dict(sizes, orient="index")
    if repeats:
        table = table.join(summarise_speeds(speed_runs(models, seq_len, decode_tokens, repeats,
                                                       seed, progress=progress)))
        table["timing_repeats"] = table["timing_repeats"].astype(int)
    if isinstance(model, Mapping):
        return table
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in table.iloc[0].items()}
