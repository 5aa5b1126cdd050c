"""``stream``: layer-streamed Block Influence against loading the model and scoring it in
memory: wall-clock time, peak resident memory, and the agreement of the scores.

Each run happens in a fresh child process, alternating the two approaches, and its peak
resident set (``ru_maxrss``: weights, activations, the Python and torch runtime, and the
pages of the safetensors files it has mapped) covers everything from start to finish,
loading included, since what streaming saves is the loading.

With ``--shapes llama-2-7b`` the benchmark first writes a random-weight checkpoint of that
shape in bf16 (13.5 GB, in shards of two blocks) to ``$SHORTGPT_LITE_BENCH_DIR`` (default
``bench_work/``), and compares the time with reading every shard from disk once. On a CPU
it scores streamed only (in memory in fp32 it would need twice this machine's RAM); with
``--device cuda --dtype bf16`` both ways, with the peak GPU memory of each. Where the page
cache can be dropped (root on Linux), the read and every run start from a cold cache.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..provenance import machine
from .bi import SHAPES
from .common import benchmark

_SHARD_BLOCKS = 2


def _windows(settings: dict):
    from ..checkpoint import model_folder
    from ..data import load_text, token_windows

    n = max(1, settings["tokens"] // settings["seq_len"])
    if settings["shapes"]:
        vocab = SHAPES[settings["shapes"]]["vocab_size"]
        return torch.randint(vocab, (n, settings["seq_len"]),
                             generator=torch.Generator().manual_seed(0))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(settings["model"]))
    return token_windows(tokenizer, load_text("wikipedia", "calibration"),
                         seq_len=settings["seq_len"], max_windows=n)


def child() -> None:
    """One approach in this fresh process; prints its time, peak RSS and scores as JSON."""
    settings = json.loads(sys.argv[1])
    torch.set_num_threads(settings["threads"])
    windows = _windows(settings)
    from ..hooks import layer_statistics

    t0 = time.perf_counter()
    # loaded whole and scored in memory, or streamed: the same call with stream on or off
    stats = layer_statistics(settings["folder"], windows, batch_size=settings["batch_size"],
                             stream=settings["approach"] == "streamed",
                             device=settings["device"], dtype=settings["dtype"], progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"seconds": seconds, "peak": peak, "gpu_peak": gpu,
                      "tokens": int(windows.numel()), "bi": stats.block_influence.tolist()}))


def _run_child(settings: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", "from shortgpt_lite.bench.stream import child; "
                          "child()", json.dumps(settings)],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"The {settings['approach']} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def write_random_checkpoint(shape: str, folder: Path) -> Path:
    """A random bf16 checkpoint of ``SHAPES[shape]``, written block by block in shards of
    ``_SHARD_BLOCKS`` blocks, never held in memory whole. Reused when already complete."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    n = config.num_hidden_layers
    groups = [[k for k in shapes if not k.startswith("model.layers.")]]
    for first in range(0, n, _SHARD_BLOCKS):
        groups.append([k for k in shapes if any(k.startswith(f"model.layers.{i}.")
                                                for i in range(first, first + _SHARD_BLOCKS))])
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for s, names in enumerate(groups):
        shard = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[name], dtype=torch.bfloat16)
                tensors[name] = t.normal_(0.0, 0.02, generator=generator)
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        del tensors
    config.save_pretrained(folder)
    index_path.write_text(json.dumps({"metadata": {"total_size": total},
                                      "weight_map": weight_map}, indent=1))
    return folder


def _read_once(folder: Path) -> float:
    t0 = time.perf_counter()
    buffer = bytearray(64 << 20)
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    return time.perf_counter() - t0


@benchmark("stream", "layer-streamed BI against loading the model and scoring it in memory")
def bench_stream(args) -> None:
    from ..checkpoint import Checkpoint, model_folder

    shape = args.shapes
    if shape and shape not in SHAPES:
        raise SystemExit(f"Unknown --shapes {shape!r}; use one of {', '.join(SHAPES)}.")
    workdir = Path(os.environ.get("SHORTGPT_LITE_BENCH_DIR", "bench_work"))
    folder = (write_random_checkpoint(shape, workdir / shape) if shape
              else model_folder(args.model))
    settings = {"model": args.model, "shapes": shape, "folder": str(folder),
                "device": args.device, "dtype": args.dtype, "tokens": args.tokens or 2048,
                "seq_len": args.seq_len, "batch_size": args.batch_size or 4,
                "threads": torch.get_num_threads()}
    size = Checkpoint(folder).nbytes()
    gib = 2 ** 30
    print(f"machine: {machine()}")
    print(f"model: {('random-weight ' + shape) if shape else args.model}, {size / gib:.2f} GiB "
          f"of safetensors in {folder}; {settings['tokens']} tokens in windows of "
          f"{settings['seq_len']}, batch size {settings['batch_size']}")
    # a 7B-shaped model in fp32 needs twice this CPU's memory in memory; a GPU holds it in bf16
    on_gpu = str(args.device).startswith("cuda")
    approaches = ["streamed"] if shape and not on_gpu else ["in memory", "streamed"]
    runs = {a: [] for a in approaches}
    if shape:
        cold = _drop_page_cache()
        read = _read_once(folder)
        print(f"reading every shard once: {read:.1f} s ({size / gib / read:.2f} GiB/s, "
              f"{'cold' if cold else 'warm'} page cache)")
    for _ in range(args.repeats):
        for a in approaches:
            if shape:
                _drop_page_cache()
            runs[a].append(_run_child({**settings, "approach": a}))
    print(f"{'approach':<10} {'min s':>7} {'median s':>9} {'peak RSS GiB':>13} "
          f"{'RSS / model size':>17} {'peak GPU GiB':>13}")
    for a, rs in runs.items():
        secs = sorted(r["seconds"] for r in rs)
        peak = max(r["peak"] for r in rs)
        gpu = max(r["gpu_peak"] or 0 for r in rs)
        print(f"{a:<10} {secs[0]:>7.1f} {secs[len(secs) // 2]:>9.1f} {peak / gib:>13.2f} "
              f"{peak / size:>17.3f} {gpu / gib if gpu else float('nan'):>13.2f}")
    if len(approaches) == 2:
        mem, st = runs["in memory"], runs["streamed"]
        ratio_t = min(r["seconds"] for r in st) / min(r["seconds"] for r in mem)
        ratio_m = max(r["peak"] for r in st) / max(r["peak"] for r in mem)
        diff = max(abs(a - b) for a, b in zip(mem[0]["bi"], st[0]["bi"]))
        print(f"streamed / in memory: time x{ratio_t:.2f}, peak RSS x{ratio_m:.2f}; "
              f"max |BI difference| {diff:.2g}")
    if shape:
        best = min(r["seconds"] for r in runs["streamed"])
        print(f"streamed / one read of the weights: x{best / read:.2f}")
