"""Benchmarks: ``python -m shortgpt_lite.bench NAME``.

Each benchmark measures the real thing side by side in one process and prints a table
that can be pasted into the README together with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

BENCHMARKS: dict = {}


def benchmark(name: str, help: str):
    """Register a benchmark function ``f(args) -> None`` under ``name``."""

    def register(f):
        BENCHMARKS[name] = (f, help)
        return f

    return register


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine, for the README next to the figures."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{gpu}, torch {torch.__version__}, Python {platform.python_version()}")


_LOAD_SNIPPET = """
import time, sys
t0 = time.perf_counter()
from shortgpt_lite import load_model
t1 = time.perf_counter()
load_model(sys.argv[1], device=sys.argv[2])
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


@benchmark("load", "time load_model from a warm cache, each load in a fresh process")
def bench_load(args) -> None:
    from .models import load_model

    load_model(args.model, device=args.device)  # builds the cache if it is missing
    imports, loads = [], []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, args.model, args.device],
                             check=True, capture_output=True, text=True).stdout.split()
        imports.append(float(out[-2]))
        loads.append(float(out[-1]))
    print(f"machine: {machine()}")
    print(f"load_model({args.model!r}), warm cache, fresh process, {args.repeats} runs:")
    print(f"  load_model call       median {statistics.median(loads):.2f} s "
          f"(min {min(loads):.2f}, max {max(loads):.2f})")
    print(f"  + import shortgpt_lite median {statistics.median(imports):.2f} s")


# Block Influence benchmarks

# Random-weight models of a known shape (``--shapes``): timing and memory depend on the
# shape, not on the weights, so a GPU owner can measure a 7B model without downloading it.
_BI_SHAPES = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "llama-tiny": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
                   "max_position_embeddings": 4096},
}
_BI_APPROACHES = {
    "forward": "plain forward pass, model(input_ids), logits included",
    "decoder": "forward stopped after the last decoder layer (no final norm, no LM head)",
    "block_influence": "shortgpt_lite.block_influence: hooks, streaming fp32 sums",
    "reference": "output_hidden_states=True, then an N x N cosine matrix per layer and sample",
}


def _bi_setup(settings: dict):
    """The model and the token windows every approach runs on."""
    from .models import _resolve_dtype, load_model, pick_device

    device = pick_device(settings["device"])
    if settings["shapes"]:
        from transformers import AutoModelForCausalLM, LlamaConfig

        if settings["shapes"] not in _BI_SHAPES:
            raise ValueError(f"Unknown --shapes {settings['shapes']!r}; use one of "
                             f"{', '.join(_BI_SHAPES)}.")
        dtype = _resolve_dtype(settings["dtype"], device)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**_BI_SHAPES[settings["shapes"]]),
                                                     dtype=dtype)
        model.eval()
        generator = torch.Generator().manual_seed(0)
        n = max(1, settings["tokens"] // settings["seq_len"])
        windows = torch.randint(model.config.vocab_size, (n, settings["seq_len"]),
                                generator=generator)
        return model, windows
    from .data import load_text, token_windows

    model, tokenizer = load_model(settings["model"], device=device, dtype=settings["dtype"])
    windows = token_windows(tokenizer, load_text("wikipedia", "calibration"),
                            seq_len=settings["seq_len"],
                            max_windows=max(1, settings["tokens"] // settings["seq_len"]))
    return model, windows


class _BIStop(Exception):
    pass


def _bi_run(name: str, model, windows, batch_size: int) -> None:
    """One pass of approach ``name`` over all windows."""
    from .hooks import block_influence
    from .layers import decoder_layers

    device = model.get_input_embeddings().weight.device
    if name == "block_influence":
        block_influence(model, windows, batch_size=batch_size, progress=False)
        return
    handle = None
    if name == "decoder":
        def stop(module, args, output):
            raise _BIStop

        handle = decoder_layers(model)[-1].register_forward_hook(stop)
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                ids = windows[s:s + batch_size].to(device)
                if name == "forward":
                    model(input_ids=ids, use_cache=False)
                elif name == "decoder":
                    try:
                        model(input_ids=ids, use_cache=False)
                    except _BIStop:
                        pass
                else:
                    # the approach of the reference code: keep every hidden state, then for
                    # each layer and sample build the seq_len x seq_len matrix of cosines
                    # and read its diagonal
                    states = model(input_ids=ids, use_cache=False,
                                   output_hidden_states=True).hidden_states
                    bi = torch.zeros(len(states) - 1, device=ids.device)
                    for i in range(len(states) - 1):
                        for b in range(ids.shape[0]):
                            x = states[i][b] / states[i][b].norm(dim=-1, keepdim=True)
                            y = states[i + 1][b] / states[i + 1][b].norm(dim=-1, keepdim=True)
                            bi[i] += 1 - (x @ y.T).diagonal().float().mean()
                    del states
    finally:
        if handle is not None:
            handle.remove()


def _bi_sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _bi_memory_child() -> None:
    """Run one approach in this fresh process and print its peak resident memory as JSON.

    Linux resets a process's peak RSS (VmHWM) when "5" is written to
    /proc/self/clear_refs, so the peak of the pass itself is measured, not the peak of
    loading the model. Where that is not allowed, ru_maxrss (peak since the start) is used.
    """
    import gc
    import json
    import resource
    import sys

    settings = json.loads(sys.argv[1])
    torch.set_num_threads(settings["threads"])
    model, windows = _bi_setup(settings)
    name = settings["approach"]
    _bi_run(name, model, windows[:1, :16], 1)  # one-time library set-up, alike for all
    gc.collect()
    loaded = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    _bi_run(name, model, windows, settings["batch_size"])
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = _peak_rss_bytes()
    print(json.dumps({"peak": peak, "loaded": loaded, "method": method}))


def _bi_memory_cpu(settings: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    # glibc otherwise raises its mmap threshold as large blocks are freed, then serves big
    # tensors from a heap it does not give back, and the peak RSS of the same pass varies by
    # 100+ MiB from run to run. A fixed threshold returns every freed tensor at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = {}
    for name in _BI_APPROACHES:
        child = subprocess.run(
            [sys.executable, "-c", "from shortgpt_lite.bench import _bi_memory_child as f; f()",
             json.dumps({**settings, "approach": name})],
            capture_output=True, text=True, check=False, env=env)
        if child.returncode != 0:
            raise RuntimeError(f"The memory run of {name!r} failed:\n{child.stderr[-3000:]}")
        result[name] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def _bi_memory_cuda(model, windows, batch_size: int, device) -> dict:
    import gc

    result = {}
    for name in _BI_APPROACHES:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        loaded = torch.cuda.memory_allocated(device)
        _bi_run(name, model, windows, batch_size)
        torch.cuda.synchronize(device)
        result[name] = {"peak": torch.cuda.max_memory_allocated(device), "loaded": loaded,
                        "method": "torch.cuda.max_memory_allocated"}
    return result


@benchmark("bi", "Block Influence vs a plain forward vs output_hidden_states + N x N cosines")
def bench_bi(args) -> None:
    import os
    settings = {"model": args.model, "device": args.device, "dtype": args.dtype,
                "shapes": args.shapes, "tokens": args.tokens or 4096, "seq_len": args.seq_len,
                "batch_size": args.batch_size or 4, "threads": torch.get_num_threads()}
    model, windows = _bi_setup(settings)
    device = model.get_input_embeddings().weight.device
    batch_size = settings["batch_size"]
    what = (f"random-weight {settings['shapes']}" if settings["shapes"] else settings["model"])
    print(f"machine: {machine()}")
    print(f"model: {what}, {model.config.num_hidden_layers} layers, {model.dtype}, on {device}; "
          f"{windows.numel()} tokens = {windows.shape[0]} windows of {windows.shape[1]}, "
          f"batch size {batch_size}; {args.repeats} timed repeats, interleaved")

    for name in _BI_APPROACHES:  # warm-up
        _bi_run(name, model, windows[:batch_size], batch_size)
    times = {name: [] for name in _BI_APPROACHES}
    cpu_times = {name: [] for name in _BI_APPROACHES}
    for _ in range(args.repeats):
        for name in _BI_APPROACHES:
            _bi_sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            _bi_run(name, model, windows, batch_size)
            _bi_sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    # Other processes only ever add time, so the fastest repeat is the least disturbed one.
    # On a shared CPU the process's own CPU time (all its threads) is steadier still.
    best = {name: min(t) for name, t in times.items()}
    cpu = {name: min(t) for name, t in cpu_times.items()}

    if device.type == "cuda":
        memory = _bi_memory_cuda(model, windows, batch_size, device)
    else:
        del model
        memory = _bi_memory_cpu(settings)
    method = next(iter(memory.values()))["method"]
    base = memory["forward"]
    mb = 2 ** 20
    print(f"peak memory: {method}" + (", one fresh process per approach, MALLOC_MMAP_THRESHOLD_"
                                      "=131072" if device.type != "cuda" else ", in this process"))
    print(f"{'approach':<16} {'wall s':>7} {'x forward':>9} {'CPU s':>7} {'x forward':>9} "
          f"{'peak MiB':>9} {'x forward':>9} {'pass MiB':>9} {'x forward':>9}")
    for name in _BI_APPROACHES:
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
    for name, text in _BI_APPROACHES.items():
        print(f"  {name}: {text}")

# Evaluation benchmarks

# A mix of prompt shapes: short two-way (PIQA), long four-way (HellaSwag), short four-way
# (ARC), one-token answers sharing one row (BoolQ, MMLU).
_EVAL_MIX = {"piqa": 16, "hellaswag": 8, "arc_easy": 8, "boolq": 4, "mmlu": 4}


def _timed(f, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    f()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _interleaved_times(runs: dict, repeats: int, device) -> dict:
    # Interleaving spreads any slowdown from other processes over all approaches alike.
    for f in runs.values():  # warm-up
        f()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, f in runs.items():
            times[name].append(_timed(f, device))
    return times


def _print_times(times: dict, tokens: int) -> None:
    import statistics

    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    base = next(iter(times))
    print(f"{'approach':<34} {'median s':>9} {'tokens/s':>9} {'x bare':>7} {'min s':>7} "
          f"{'x bare':>7}")
    for name in times:
        print(f"{name:<34} {med[name]:>9.2f} {tokens / med[name]:>9.0f} "
              f"{med[base] / med[name]:>7.3f} {best[name]:>7.2f} {best[base] / best[name]:>7.3f}")


@benchmark("eval", "perplexity and multiple-choice scoring vs bare forward passes of the same "
                   "batches (token throughput)")
def bench_eval(args) -> None:
    from . import evaluate as ev
    from .data import load_benchmark, load_text, token_windows
    from .models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = model.get_input_embeddings().weight.device
    tokens = args.tokens or 2048
    windows = token_windows(tokenizer, load_text("wikipedia", "evaluation"), args.seq_len,
                            max_windows=max(1, tokens // args.seq_len))
    ppl_batch = args.batch_size or ev._default_ppl_batch(model, args.seq_len)
    choice_batch = args.batch_size or 16
    items = [it for name, n in _EVAL_MIX.items() for it in load_benchmark(name, n, seed=0)]
    requests = [r for it in items for r in it.requests]
    batches = ev._plan_batches(model, tokenizer, requests, choice_batch)
    real = sum(int(ids.numel() if m is None else m.sum()) for ids, m, *_ in batches)
    padded = sum(ids.numel() for ids, *_ in batches)

    def forward_windows():
        with torch.inference_mode():
            for start in range(0, len(windows), ppl_batch):
                model(windows[start:start + ppl_batch].to(device), use_cache=False)

    def forward_batches():
        with torch.inference_mode():
            for ids, mask, pos, *_ in batches:
                model(ids.to(device), attention_mask=None if mask is None else mask.to(device),
                      position_ids=None if pos is None else pos.to(device), use_cache=False)

    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; {args.repeats} interleaved repeats "
          "after a warm-up")
    print(f"\nperplexity: {windows.numel()} tokens = {len(windows)} windows of {args.seq_len}, "
          f"batch {ppl_batch}")
    _print_times(_interleaved_times({
        "bare forward": forward_windows,
        "perplexity()": lambda: ev.perplexity(model, windows, ppl_batch, progress=False),
    }, args.repeats, device), windows.numel())

    mix = ", ".join(f"{k} {v}" for k, v in _EVAL_MIX.items())
    print(f"\nmultiple choice: {len(items)} items ({mix}), {len(requests)} requests in "
          f"{sum(len(b[0]) for b in batches)} distinct rows, {len(batches)} left-padded batches "
          f"of up to {choice_batch}; {real} tokens ({padded} with padding)")
    _print_times(_interleaved_times({
        "bare forward (all logits)": forward_batches,
        "loglikelihoods() incl. tokenising": lambda: ev.loglikelihoods(
            model, tokenizer, requests, choice_batch, progress=False),
    }, args.repeats, device), real)
    print("tokens/s counts real (non-padding) tokens. 'bare forward' is model(input_ids) on the "
          "same batches,\nwith logits at every position; loglikelihoods() asks only for the "
          "positions it scores.")


@benchmark("cost", "cost(): parameters, safetensors size, peak memory, prefill and decode speed")
def bench_cost(args) -> None:
    from .evaluate import cost
    from .models import load_model

    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    result = cost(model, seq_len=args.seq_len, repeats=args.repeats)
    print(f"machine: {machine()}")
    print(f"model: {args.model}")
    for key, value in result.items():
        print(f"  {key:<22} {value:,.3f}" if isinstance(value, float)
              else f"  {key:<22} {value:,}" if isinstance(value, int) else
              f"  {key:<22} {value}")

# Baseline benchmarks


def _wanda_passes(model, windows, batch_size: int) -> None:
    """The forward passes Wanda's calibration makes, without hooks, scores or masks: the
    inputs of block 0, then every block twice (statistics, pruned outputs)."""
    from .layers import decoder_layers
    from .wanda import _block_inputs, _run_block

    with torch.inference_mode():
        hidden, calls, tuple_output = _block_inputs(model, windows, batch_size)
        blocks = decoder_layers(model)
        for b, block in enumerate(blocks):
            _run_block(block, hidden, calls[b], tuple_output)
            if b < len(blocks) - 1:
                hidden = _run_block(block, hidden, calls[b], tuple_output)


@benchmark("wanda", "Wanda's time against the calibration forward passes alone "
                    "(default 64 x 512 tokens; --repeats timed runs of each)")
def bench_wanda(args) -> None:
    import copy
    import statistics

    from .data import load_text, token_windows
    from .models import load_model
    from .wanda import sparsity_report, wanda_prune

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = model.get_input_embeddings().weight.device
    batch_size = args.batch_size or 8
    windows = token_windows(tokenizer, load_text("wikipedia", "calibration"), args.seq_len,
                            max_windows=max(1, (args.tokens or 64 * 512) // args.seq_len))

    def plain_forward():
        with torch.inference_mode():
            for s in range(0, len(windows), batch_size):
                model(windows[s:s + batch_size].to(device), use_cache=False)

    times: dict = {"plain forward (one full pass, logits included)": [],
                   "Wanda's block passes (2 per block), no scoring": [],
                   "wanda_prune(sparsity=0.5)": []}
    names = list(times)
    pruned = None
    for _ in range(args.repeats):
        times[names[0]].append(_timed(plain_forward, device))
        times[names[1]].append(_timed(lambda: _wanda_passes(model, windows, batch_size), device))
        target = copy.deepcopy(model)  # not timed
        t0 = time.perf_counter()
        pruned = wanda_prune(target, windows, 0.5, batch_size=batch_size, inplace=True,
                             progress=False)
        _bi_sync(device)
        times[names[2]].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    achieved = sparsity_report(pruned)
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; calibration {windows.numel()} tokens "
          f"= {len(windows)} windows of {windows.shape[1]}, batch {batch_size}; median of "
          f"{args.repeats} run(s)")
    print(f"{'approach':<50} {'median s':>9} {'Wanda / this':>13}")
    for name in names:
        print(f"{name:<50} {median[name]:>9.1f} {median[names[2]] / median[name]:>13.2f}")
    print(f"achieved sparsity of the block linears: {achieved['zeros'].sum() / achieved['params'].sum():.4f} "
          f"(per layer {achieved['sparsity'].min():.4f} .. {achieved['sparsity'].max():.4f})")
    print("target: Wanda under 2x the calibration forward passes alone")


@benchmark("context", "physical removal of MLP neurons vs zero-masking at the same sparsity: "
                      "prefill latency and decode speed")
def bench_context(args) -> None:
    import statistics

    from .compare import _speed
    from .context import context_plan, context_prune, context_statistics, domain_windows
    from .models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = model.get_input_embeddings().weight.device
    windows = domain_windows(tokenizer, "law", 512, max(1, (args.tokens or 4 * 512) // 512))
    stats = context_statistics(model, windows, domain="law", progress=False)
    seq_len, decode = args.seq_len, 32
    print(f"machine: {machine()}")
    print(f"model: {args.model}, {model.dtype}, on {device}; statistics from {windows.numel()} "
          f"law tokens; prefill of {seq_len} tokens and {decode} decode steps at batch 1, "
          f"median of {args.repeats}")
    print(f"{'MLP neurons pruned':<19} {'model':<10} {'intermediate':>12} {'params (M)':>10} "
          f"{'prefill s':>9} {'decode tok/s':>12} {'prefill speedup':>15} {'decode speedup':>14}")
    for fraction in (0.0, 0.25, 0.5):
        plan = context_plan(stats, fraction=fraction, linear=False, embeddings=False)
        masked = context_prune(model, plan, progress=False)
        physical = context_prune(model, plan, physical=True, progress=False)
        speed = {}
        for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
            for name, m in (("zero-mask", masked), ("physical", physical)):
                r = _speed(m, seq_len, decode, 1, 0)
                speed.setdefault(name, []).append(r)
        for name, m in (("zero-mask", masked), ("physical", physical)):
            prefill = statistics.median(r["prefill_seconds"] for r in speed[name])
            tps = statistics.median(r["decode_tokens_per_s"] for r in speed[name])
            base_prefill = statistics.median(r["prefill_seconds"] for r in speed["zero-mask"])
            base_tps = statistics.median(r["decode_tokens_per_s"] for r in speed["zero-mask"])
            params = sum(p.numel() for p in m.parameters()) / 1e6
            print(f"{fraction:<19.0%} {name:<10} {m.config.intermediate_size:>12} {params:>10.1f} "
                  f"{prefill:>9.3f} {tps:>12.1f} {base_prefill / prefill:>14.2f}x "
                  f"{tps / base_tps:>13.2f}x")
        del masked, physical


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shortgpt_lite.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=None,
                        help="calibration or evaluation tokens (each benchmark has its default)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--shapes", default=None,
                        help="random-weight model with a known shape, e.g. 'llama-2-7b'")
    args = parser.parse_args(argv)
    BENCHMARKS[args.name][0](args)


if __name__ == "__main__":
    main()
