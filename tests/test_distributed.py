"""Data-parallel scoring: two gloo processes, each on its share of the windows, give the
statistics of one process on all of them."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shortgpt_lite.hooks import layer_statistics
from tiny import byte_tokenizer, tiny_llama

OPTIONS = dict(angular=2, similarity=True, relative_magnitude=True, progress=False)
NAMES = ["block_influence", "relative_magnitude", "layer_similarity", "angular_distance"]


def _windows():
    return torch.randint(3, 120, (6, 16), generator=torch.Generator().manual_seed(0))


def _worker(rank, world, folder, init, stream, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        stats = layer_statistics(str(folder), _windows()[rank::world], batch_size=2,
                                 distributed=True, stream=stream, **OPTIONS)
        torch.save({n: getattr(stats, n) for n in NAMES} | {"tokens": stats.tokens},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stream", [False, True])
def test_two_gloo_processes_equal_one(stream, tmp_path):
    tiny_llama(layers=5).save_pretrained(tmp_path / "model")
    one = layer_statistics(str(tmp_path / "model"), _windows(), batch_size=2, **OPTIONS)
    mp.spawn(_worker, args=(2, tmp_path / "model", f"file://{tmp_path / 'pg'}", stream,
                            tmp_path / "stats"), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'stats'}.{rank}")
        assert got["tokens"] == one.tokens == 6 * 16
        for name in NAMES:
            assert torch.allclose(got[name], getattr(one, name), atol=1e-6, equal_nan=True), name
    # a check that could fail: one rank's share alone is not the whole
    half = layer_statistics(str(tmp_path / "model"), _windows()[0::2], batch_size=2, **OPTIONS)
    assert not torch.allclose(half.block_influence, one.block_influence)


def test_torchrun_score_writes_the_single_process_scores(tmp_path):
    folder = tmp_path / "model"
    tiny_llama(vocab_size=320, layers=4).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    common = ["score", "--model", str(folder), "--tokens", "512", "--seq-len", "64",
              "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "shortgpt_lite.cli", *common,
                             "--json", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, "-m", "shortgpt_lite.cli", *common, "--stream",
                          "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data-parallel over 2 processes" in two.stdout
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert b["processes"] == 2 and b["streamed"]
    assert torch.allclose(torch.tensor(a["scores"]), torch.tensor(b["scores"]), atol=1e-6)
    assert a["removal_order"] == b["removal_order"]
