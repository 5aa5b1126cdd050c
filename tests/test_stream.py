"""Layer-streamed scoring against the in-memory pass, on tiny models saved to disk."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import shortgpt_lite as sgl
from shortgpt_lite import stream
from shortgpt_lite.checkpoint import Checkpoint
from shortgpt_lite.hooks import layer_statistics
from tiny import ARCHITECTURES, tiny_llama, tiny_model

STATS = ["block_influence", "relative_magnitude", "layer_similarity", "angular_distance"]


def _padded_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (6, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padding
    mask[2, -3:] = 0  # right padding
    return [(ids[:4], mask[:4]), (ids[4:], mask[4:])]


def _same(a, b, names=STATS, atol=1e-6):
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert x is not None and y is not None, name
        assert torch.allclose(x, y, atol=atol, rtol=1e-5, equal_nan=True), (name, x, y)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_statistics_equal_the_in_memory_pass(arch, tmp_path):
    model = tiny_model(arch, layers=5)
    model.save_pretrained(tmp_path)
    data = _padded_batches()
    options = dict(angular=3, similarity=True, relative_magnitude=True, progress=False)
    _same(layer_statistics(model, data, **options),
          stream.streamed_layer_statistics(tmp_path, data, **options))


def test_streamed_last_token_pairs_and_norms_on_a_sharded_checkpoint(tmp_path):
    model = tiny_model("gemma3", layers=7)  # sliding-window and global layers differ
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(Checkpoint(tmp_path).shards()) > 2
    data = _padded_batches(1)
    options = dict(angular=7, pair_tokens="last", norms=True, progress=False)
    _same(layer_statistics(model, data, **options),
          stream.streamed_layer_statistics(tmp_path, data, **options),
          ["block_influence", "angular_distance", "state_norm", "update_ratio"])


def test_the_streamed_scores_depend_on_the_weights(tmp_path):
    # a check that could fail: another model's scores differ from these
    tiny_llama(seed=1).save_pretrained(tmp_path / "a")
    tiny_llama(seed=2).save_pretrained(tmp_path / "b")
    data = _padded_batches()
    a = sgl.block_influence(tmp_path / "a", data, stream=True, progress=False)
    b = sgl.block_influence(tmp_path / "b", data, stream=True, progress=False)
    assert not torch.allclose(a, b)


def test_layer_importance_streams_the_one_pass_metrics_and_refuses_the_others(tmp_path):
    model = tiny_llama(layers=6)
    model.save_pretrained(tmp_path)
    data = _padded_batches()
    for metric in ("bi", "angular", "relative_magnitude", "reverse"):
        got = sgl.layer_importance(tmp_path, data, metric, stream=True, progress=False)
        want = sgl.layer_importance(model, data, metric, progress=False)
        assert torch.allclose(got, want, atol=1e-6), metric
    for metric in ("ppl", "taylor"):
        with pytest.raises(ValueError, match="cannot be streamed"):
            sgl.layer_importance(tmp_path, data, metric, stream=True, progress=False)
    with pytest.raises(ValueError, match="not a loaded model"):
        sgl.block_influence(model, data, stream=True, progress=False)
    with pytest.raises(ValueError, match="stream=True"):
        sgl.layer_statistics(model, data, resume_dir=tmp_path / "state", progress=False)


def test_a_folder_without_safetensors_gets_a_clear_error(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # an old-style checkpoint
    with pytest.raises(ValueError, match="no safetensors weights.*save_pretrained"):
        sgl.block_influence(tmp_path, _padded_batches(), stream=True, progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        Checkpoint(tmp_path / "nowhere")


class _Interrupt(Exception):
    pass


def test_an_interrupted_streamed_run_resumes_after_the_last_finished_block(tmp_path, monkeypatch):
    model = tiny_llama(layers=6)
    model.save_pretrained(tmp_path / "model")
    data = _padded_batches()
    options = dict(angular=2, relative_magnitude=True, similarity=True, progress=False,
                   resume_dir=tmp_path / "state")
    whole = layer_statistics(model, data, **{**options, "resume_dir": None})

    loaded = []
    real = Checkpoint.load_into

    def load_into(self, module, prefix, *args, **kwargs):
        loaded.append(prefix)
        if prefix == "model.layers.3." and fail["now"]:
            raise _Interrupt
        return real(self, module, prefix, *args, **kwargs)

    fail = {"now": True}
    monkeypatch.setattr(Checkpoint, "load_into", load_into)
    with pytest.raises(_Interrupt):
        stream.streamed_layer_statistics(tmp_path / "model", data, **options)
    assert (tmp_path / "state" / "stream_state.pt").is_file()

    fail["now"], loaded[:] = False, []
    resumed = stream.streamed_layer_statistics(tmp_path / "model", data, **options)
    blocks = [p for p in loaded if p.startswith("model.layers.")]
    assert blocks == [f"model.layers.{i}." for i in range(3, 6)]  # 0-2 were not redone
    _same(whole, resumed)

    with pytest.raises(ValueError, match="other inputs"):
        stream.streamed_layer_statistics(tmp_path / "model", _padded_batches(5), **options)


@pytest.mark.parametrize("arch,sparsity", [("llama", 0.5), ("gemma3", "2:4"), ("falcon", 0.3)])
def test_streamed_wanda_writes_what_wanda_prune_writes(arch, sparsity, tmp_path):
    model = tiny_model(arch, layers=4)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    windows = torch.randint(3, 120, (6, 16), generator=torch.Generator().manual_seed(3))
    got = stream.streamed_wanda(tmp_path / "src", windows, tmp_path / "out", sparsity,
                                batch_size=4, progress=False)
    sgl.wanda_prune(model, windows, sparsity, batch_size=4).save_pretrained(tmp_path / "ref")
    ours, theirs = Checkpoint(got), Checkpoint(tmp_path / "ref")
    assert sorted(ours.weight_map) == sorted(theirs.weight_map)
    zeros = 0
    for name in theirs.weight_map:
        a, b = ours.get(name), theirs.get(name)
        assert torch.equal(a, b), name
        zeros += int((a == 0).sum())
    assert zeros > 0  # something was pruned
    reloaded = AutoModelForCausalLM.from_pretrained(got)
    record = sgl.pruning_records(reloaded)["shortgpt_lite_sparsity"]
    assert record["method"] == "wanda" and record["calibration_tokens"] == 96
    with pytest.raises(ValueError, match="not empty"):
        stream.streamed_wanda(tmp_path / "src", windows, tmp_path / "out", sparsity)
