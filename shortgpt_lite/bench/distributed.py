"""``distributed``: data-parallel Block Influence, N gloo processes under torchrun against
one process, on the same windows, through the ``shortgpt-lite score`` command.

One process gets every core as torch threads; each of N processes gets cores / N threads,
so both use the whole machine. The table gives the scoring time the command reports (the
model loaded, before the pass) and the whole command's wall-clock time, start-up included,
the fastest of ``--repeats`` alternating runs, and checks that the scores agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from ..provenance import machine
from .common import benchmark


def _score(model: str, tokens: int, seq_len: int, batch_size: int, processes: int,
           threads: int, out: str) -> tuple[float, dict]:
    command = ["score", "--model", model, "--tokens", str(tokens), "--seq-len", str(seq_len),
               "--batch-size", str(batch_size), "--no-progress", "--json", out]
    launcher = [sys.executable, "-m", "shortgpt_lite.cli"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", str(processes), "-m", "shortgpt_lite.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    run = subprocess.run(launcher + command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{run.stderr[-3000:]}")
    with open(out) as fh:
        return wall, json.load(fh)


@benchmark("distributed", "data-parallel BI: N gloo processes under torchrun against one")
def bench_distributed(args) -> None:
    cores = os.cpu_count() or 1
    processes = 2
    tokens, batch = args.tokens or 8192, args.batch_size or 4
    print(f"machine: {machine()}")
    print(f"model: {args.model}; {tokens} tokens in windows of {args.seq_len}, batch size "
          f"{batch}; 1 process x {cores} threads against {processes} processes x "
          f"{max(1, cores // processes)} threads; {args.repeats} alternating repeats")
    runs = {1: [], processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for p in runs:
                runs[p].append(_score(args.model, tokens, args.seq_len, batch, p,
                                      max(1, cores // p), f"{tmp}/{p}-{r}.json"))
    print(f"{'processes':>9} {'scoring s':>10} {'command s':>10}")
    for p, rs in runs.items():
        print(f"{p:>9} {min(r[1]['seconds'] for r in rs):>10.1f} {min(r[0] for r in rs):>10.1f}")
    one, many = runs[1][0][1]["scores"], runs[processes][0][1]["scores"]
    best = {p: min(r[1]["seconds"] for r in rs) for p, rs in runs.items()}
    print(f"speed-up of the scoring: x{best[1] / best[processes]:.2f}; max |BI difference| "
          f"{max(abs(a - b) for a, b in zip(one, many)):.2g}")
