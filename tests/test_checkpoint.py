"""prune_checkpoint: a pruned checkpoint written tensor by tensor equals the one that
remove_layers(...).save_pretrained writes, and loads with plain transformers."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import shortgpt_lite as sgl
from shortgpt_lite.checkpoint import Checkpoint, prune_checkpoint
from tiny import tiny_llama, tiny_model


def _tensors(folder):
    c = Checkpoint(folder)
    return {name: c.get(name) for name in c.weight_map}


def _config(folder):
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return config


@pytest.mark.parametrize("arch,shard", [("gemma3", "20KB"), ("llama", None), ("gpt2", "30KB")])
def test_prune_checkpoint_equals_remove_layers_then_save(arch, shard, tmp_path):
    model = tiny_model(arch, layers=7)
    model.save_pretrained(tmp_path / "src", **({"max_shard_size": shard} if shard else {}))
    plan, scores = [1, 4, 5], torch.linspace(0, 1, 7)
    got = prune_checkpoint(tmp_path / "src", plan, tmp_path / "out", scores=scores, metric="bi")
    sgl.remove_layers(model, plan, scores=scores, metric="bi").save_pretrained(tmp_path / "ref")

    ours, theirs = _tensors(got), _tensors(tmp_path / "ref")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert _config(got) == _config(tmp_path / "ref")
    assert AutoConfig.from_pretrained(got).num_hidden_layers == 4  # n_layer in GPT-2's json
    if arch == "gemma3":
        kept = [i for i in range(7) if i not in plan]
        assert _config(got)["layer_types"] == [model.config.layer_types[i] for i in kept]
    if shard:
        assert (got / "model.safetensors.index.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(got).eval()
    ids = torch.randint(3, 120, (2, 12))
    with torch.no_grad():
        want = sgl.remove_layers(model, plan)(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-5)
    assert sgl.pruning_records(reloaded)["shortgpt_lite"]["removed_layers"] == plan


def test_prune_checkpoint_refuses_bad_input_and_overwrites_nothing(tmp_path):
    tiny_llama(layers=4).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
        prune_checkpoint(tmp_path / "src", [4], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one must stay"):
        prune_checkpoint(tmp_path / "src", [0, 1, 2, 3], tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        prune_checkpoint(tmp_path / "src", [1], tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="scores has 3 entries"):
        prune_checkpoint(tmp_path / "src", [1], tmp_path / "out2", scores=[0.1, 0.2, 0.3])
    (tmp_path / "src" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no safetensors"):
        prune_checkpoint(tmp_path / "src", [1], tmp_path / "out3")
