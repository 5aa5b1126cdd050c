"""``bi``: Block Influence against a plain forward pass, a forward pass stopped after the
last decoder block, and the reference implementations' approach, in wall-clock time, CPU
time and peak memory.

On a CPU the peak memory of each approach is measured in a fresh child process
(:func:`memory_child`), so one approach's freed memory cannot hide another's peak; on
CUDA it is ``torch.cuda.max_memory_allocated`` in this process.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ..costs import PeakMemory, synchronize
from ..data import load_text, token_windows
from ..hooks import block_influence
from ..inputs import input_device
from ..layers import decoder_layers, stop_after
from ..models import load_model, pick_device, resolve_dtype
from ..provenance import machine
from .common import benchmark

# Random-weight models of a known shape (``--shapes``): timing and memory depend on the
# shape, not on the weights, so a GPU owner can measure a 7B model without downloading it.
SHAPES = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "llama-tiny": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
                   "max_position_embeddings": 4096},
}
APPROACHES = {
    "forward": "plain forward pass, model(input_ids), logits included",
    "decoder": "forward stopped after the last decoder layer (no final norm, no LM head)",
    "block_influence": "shortgpt_lite.block_influence: hooks, streaming fp32 sums",
    "reference": "output_hidden_states=True, then an N x N cosine matrix per layer and sample",
}


def setup(settings: dict):
    """The model and the token windows every approach runs on."""
    device = pick_device(settings["device"])
    n = max(1, settings["tokens"] // settings["seq_len"])
    if settings["shapes"]:
        if settings["shapes"] not in SHAPES:
            raise ValueError(f"Unknown --shapes {settings['shapes']!r}; use one of "
                             f"{', '.join(SHAPES)}.")
        dtype = resolve_dtype(settings["dtype"], device)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[settings["shapes"]]),
                                                     dtype=dtype)
        model.eval()
        generator = torch.Generator().manual_seed(0)
        windows = torch.randint(model.config.vocab_size, (n, settings["seq_len"]),
                                generator=generator)
        return model, windows
    model, tokenizer = load_model(settings["model"], device=device, dtype=settings["dtype"])
    windows = token_windows(tokenizer, load_text("wikipedia", "calibration"),
                            seq_len=settings["seq_len"], max_windows=n)
    return model, windows


def _reference_bi(states) -> torch.Tensor:
    # the approach of the reference code: keep every hidden state, then for each layer
    # and sample build the seq_len x seq_len matrix of cosines and read its diagonal
    bi = torch.zeros(len(states) - 1, device=states[0].device)
    for i in range(len(states) - 1):
        for b in range(states[i].shape[0]):
            x = states[i][b] / states[i][b].norm(dim=-1, keepdim=True)
            y = states[i + 1][b] / states[i + 1][b].norm(dim=-1, keepdim=True)
            bi[i] += 1 - (x @ y.T).diagonal().float().mean()
    return bi


def run_approach(name: str, model, windows, batch_size: int) -> None:
    """One pass of approach ``name`` over all windows."""
    if name == "block_influence":
        block_influence(model, windows, batch_size=batch_size, progress=False)
        return
    device = input_device(model)
    last = decoder_layers(model)[-1]
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size].to(device)
            if name == "forward":
                model(input_ids=ids, use_cache=False)
            elif name == "decoder":
                with stop_after(last):
                    model(input_ids=ids, use_cache=False)
            else:
                states = model(input_ids=ids, use_cache=False,
                               output_hidden_states=True).hidden_states
                _reference_bi(states)
                del states


# ---------------------------------------------------------------------- peak memory


def measure_memory(name: str, model, windows, batch_size: int, device) -> dict:
    """``{"peak", "loaded", "method"}`` of one pass of approach ``name``: the memory in use
    before it, and at its peak (:class:`shortgpt_lite.costs.PeakMemory`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as peak:
        run_approach(name, model, windows, batch_size)
    return {"peak": peak.start + peak.extra, "loaded": peak.start, "method": peak.kind}


def memory_child() -> None:
    """Run one approach in this fresh process and print :func:`measure_memory` as JSON.

    The settings are the JSON in ``sys.argv[1]``. On Linux the process's peak RSS is reset
    just before the pass, so the peak of the pass itself is measured, not the peak of
    loading the model.
    """
    settings = json.loads(sys.argv[1])
    torch.set_num_threads(settings["threads"])
    model, windows = setup(settings)
    name = settings["approach"]
    run_approach(name, model, windows[:1, :16], 1)  # one-time library set-up, alike for all
    print(json.dumps(measure_memory(name, model, windows, settings["batch_size"],
                                    torch.device("cpu"))))


def memory_cpu(settings: dict) -> dict:
    """``{approach: {"peak", "loaded", "method"}}``, one fresh process per approach."""
    # glibc otherwise raises its mmap threshold as large blocks are freed, then serves big
    # tensors from a heap it does not give back, and the peak RSS of the same pass varies by
    # 100+ MiB from run to run. A fixed threshold returns every freed tensor at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = {}
    for name in APPROACHES:
        child = subprocess.run(
            [sys.executable, "-c", "from shortgpt_lite.bench.bi import memory_child; "
             "memory_child()", json.dumps({**settings, "approach": name})],
            capture_output=True, text=True, check=False, env=env)
        if child.returncode != 0:
            raise RuntimeError(f"The memory run of {name!r} failed:\n{child.stderr[-3000:]}")
        result[name] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------ benchmark


@benchmark("bi", "Block Influence vs a plain forward vs output_hidden_states + N x N cosines")
def bench_bi(args) -> None:
    settings = {"model": args.model, "device": args.device, "dtype": args.dtype,
                "shapes": args.shapes, "tokens": args.tokens or 4096, "seq_len": args.seq_len,
                "batch_size": args.batch_size or 4, "threads": torch.get_num_threads()}
    model, windows = setup(settings)
    device = input_device(model)
    batch_size = settings["batch_size"]
    what = (f"random-weight {settings['shapes']}" if settings["shapes"] else settings["model"])
    print(f"machine: {machine()}")
    print(f"model: {what}, {model.config.num_hidden_layers} layers, {model.dtype}, on {device}; "
          f"{windows.numel()} tokens = {windows.shape[0]} windows of {windows.shape[1]}, "
          f"batch size {batch_size}; {args.repeats} timed repeats, interleaved")

    for name in APPROACHES:  # warm-up
        run_approach(name, model, windows[:batch_size], batch_size)
    times = {name: [] for name in APPROACHES}
    cpu_times = {name: [] for name in APPROACHES}
    for _ in range(args.repeats):
        for name in APPROACHES:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            run_approach(name, model, windows, batch_size)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    # Other processes only ever add time, so the fastest repeat is the least disturbed one.
    # On a shared CPU the process's own CPU time (all its threads) is steadier still.
    best = {name: min(t) for name, t in times.items()}
    cpu = {name: min(t) for name, t in cpu_times.items()}

    if device.type == "cuda":
        memory = {name: measure_memory(name, model, windows, batch_size, device)
                  for name in APPROACHES}
    else:
        del model
        memory = memory_cpu(settings)
    method = next(iter(memory.values()))["method"]
    base = memory["forward"]
    mb = 2 ** 20
    print(f"peak memory: {method}" + (", one fresh process per approach, MALLOC_MMAP_THRESHOLD_"
                                      "=131072" if device.type != "cuda" else ", in this process"))
    print(f"{'approach':<16} {'wall s':>7} {'x forward':>9} {'CPU s':>7} {'x forward':>9} "
          f"{'peak MiB':>9} {'x forward':>9} {'pass MiB':>9} {'x forward':>9}")
    for name in APPROACHES:
        m = memory[name]
        extra, base_extra = m["peak"] - m["loaded"], base["peak"] - base["loaded"]
        print(f"{name:<16} {best[name]:>7.2f} {best[name] / best['forward']:>9.3f} "
              f"{cpu[name]:>7.2f} {cpu[name] / cpu['forward']:>9.3f} "
              f"{m['peak'] / mb:>9.0f} {m['peak'] / base['peak']:>9.3f} {extra / mb:>9.0f} "
              f"{extra / max(base_extra, 1):>9.3f}")
    print("wall s / CPU s: the fastest repeat, wall-clock / CPU time of this process; "
          "pass MiB: peak minus the memory held before the pass (model, data)")
    if device.type == "cpu":
        print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for name, text in APPROACHES.items():
        print(f"  {name}: {text}")
