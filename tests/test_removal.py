"""remove_layers: KV cache, config bookkeeping, save/reload, bad input."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

from shortgpt_lite import decoder_layers, remove_layers
from shortgpt_lite.inputs import cache_keyword
from shortgpt_lite.records import REMOVAL_RECORD
from tiny import ARCHITECTURES, VOCAB, tiny_model


def _ids(n=2, length=12, seed=3):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _incremental_logits(model, ids, prefix=5):
    """Logits of every position after ``prefix``, decoding one token at a time with a KV cache."""
    with torch.no_grad():
        cache = cache_keyword(model)
        out = model(ids[:, :prefix], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(prefix, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], use_cache=True, **{cache: out[cache]})
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_kv_cache_after_removal_matches_a_full_forward(name):
    model = tiny_model(name, layers=6)
    pruned = remove_layers(model, [0, 2, 3])
    ids = _ids()
    with torch.no_grad():
        full = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(_incremental_logits(pruned, ids), full[:, 4:-1], atol=2e-5,
                               rtol=1e-4)
    for new, block in enumerate(decoder_layers(pruned)):
        assert {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")} == {new}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_save_and_reload_gives_identical_logits(name, tmp_path):
    model = tiny_model(name, layers=6)
    pruned = remove_layers(model, [1, 4], scores=torch.arange(6.0), metric="bi")
    pruned.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(decoder_layers(reloaded)) == 4
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert getattr(reloaded.config, REMOVAL_RECORD)["removed_layers"] == [1, 4]


def test_per_layer_config_lists_follow_the_removal():
    model = tiny_model("gemma3", layers=12)
    types = list(model.config.layer_types)
    assert types[5] == types[11] == "full_attention"
    pruned = remove_layers(model, [0, 5, 6])
    assert pruned.config.num_hidden_layers == 9
    assert pruned.config.layer_types == [types[i] for i in range(12) if i not in (0, 5, 6)]
    assert pruned.config.layer_types.count("full_attention") == 1
    assert model.config.layer_types == types  # the input is untouched


def _llama_forward_skipping(model, ids, removed):
    """Llama's forward written out by hand, leaving out the ``removed`` blocks."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(hidden, positions)
    for i, layer in enumerate(inner.layers):
        if i not in removed:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope,
                           position_ids=positions)
    return model.lm_head(inner.norm(hidden))


def _greedy_by_hand(model, ids, removed, n):
    with torch.no_grad():
        for _ in range(n):
            token = _llama_forward_skipping(model, ids, removed)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    return ids


def _generate(model, ids, n, use_cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, use_cache=use_cache, eos_token_id=None,
                              pad_token_id=0)


def test_generation_with_cache_equals_without_and_equals_hand_written_forward():
    model = tiny_model("llama", layers=6)
    removed = [1, 2, 4]
    pruned = remove_layers(model, removed)
    prompt = _ids(n=1, length=5)
    with_cache = _generate(pruned, prompt, 10, use_cache=True)
    assert with_cache.shape[1] == 15
    assert torch.equal(with_cache, _generate(pruned, prompt, 10, use_cache=False))
    assert torch.equal(with_cache, _greedy_by_hand(model, prompt, removed, 10))


def test_multimodal_gemma3_keeps_its_text_config_in_step():
    from tiny import tiny_config

    text = tiny_config("gemma3", 6)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)).eval()
    pruned = remove_layers(model, [0, 5])
    assert pruned.config.text_config.num_hidden_layers == 4
    assert pruned.config.text_config.layer_types == ["sliding_attention"] * 4
    assert pruned.config.vision_config.num_hidden_layers == 2
    ids = _ids()
    with torch.no_grad():
        full = pruned(ids, use_cache=False).logits
    torch.testing.assert_close(_incremental_logits(pruned, ids), full[:, 4:-1], atol=2e-5,
                               rtol=1e-4)


def test_input_model_is_untouched_unless_inplace():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    pruned = remove_layers(model, [2])
    assert pruned is not model
    assert len(model.model.layers) == 4 and len(pruned.model.layers) == 3
    assert model.config.to_dict() == config_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    same = remove_layers(model, [2], inplace=True)
    assert same is model and len(model.model.layers) == 3


def test_the_config_records_what_was_removed_in_original_numbering():
    model = tiny_model("llama", layers=8)
    once = remove_layers(model, [1, 5], scores=torch.linspace(0, 1, 8), metric="bi")
    twice = remove_layers(once, [0, 4], metric="sequential")
    record = getattr(twice.config, REMOVAL_RECORD)
    assert record["original_num_hidden_layers"] == 8
    # layers 0 and 4 of [0, 2, 3, 4, 6, 7] are the original 0 and 6
    assert record["removed_layers"] == [0, 1, 5, 6]
    assert [s["removed"] for s in record["steps"]] == [[1, 5], [0, 4]]
    assert record["steps"][0]["metric"] == "bi" and len(record["steps"][0]["scores"]) == 8
    assert record["steps"][1]["scores"] is None
    assert twice.config.num_hidden_layers == 4
    json.dumps(twice.config.to_dict())  # it serialises


def test_reload_needs_no_shortgpt_lite(tmp_path):
    model = tiny_model("qwen2", layers=5)
    pruned = remove_layers(model, [3])
    pruned.save_pretrained(tmp_path)
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.load(sys.argv[1] + '/ids.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(m(ids).logits, sys.argv[1] + '/logits.pt')\n"
        "assert not any(k.startswith('shortgpt_lite') for k in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), pruned(ids).logits)


def test_peft_wrapped_and_dispatched_models():
    from accelerate import dispatch_model

    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_model("llama"),
                                  peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    pruned = remove_layers(wrapped, [0])
    assert len(decoder_layers(pruned)) == 3 and len(decoder_layers(wrapped)) == 4
    assert pruned.base_model.model.config.num_hidden_layers == 3

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}}
    dispatched = dispatch_model(tiny_model("llama"), device_map=device_map, force_hooks=True)
    dispatched.hf_device_map = dict(device_map)
    remove_layers(dispatched, [1], inplace=True)
    assert sorted(k for k in dispatched.hf_device_map if k.startswith("model.layers")) == [
        "model.layers.0", "model.layers.1", "model.layers.2"]
    ids = _ids()
    torch.testing.assert_close(_incremental_logits(dispatched, ids),
                               dispatched(ids, use_cache=False).logits[:, 4:-1].detach(),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layers, message", [
    ([4], "Layer index 4 is out of range: the model has 4 layers, numbered 0 to 3"),
    ([-1], "Layer index -1 is negative; layers are numbered 0 to 3"),
    ([1, 1], "Layer 1 is listed more than once"),
    ([1.0], "Layer indices must be integers; got 1.0"),
    (["2"], "Layer indices must be integers; got '2'"),
    ([True], "Layer indices must be integers; got True"),
    ([0, 1, 2, 3], "Cannot remove all 4 layers: at least one must stay"),
    ("0, 1", "layers must be a list of layer indices"),
    (2, "layers must be a list of layer indices"),
])
def test_bad_layer_lists_are_value_errors(layers, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        remove_layers(model, layers)
    assert len(model.model.layers) == 4


def test_scores_must_match_the_layers_and_numpy_or_tensor_indices_work():
    import numpy as np

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="scores has 3 entries but the model has 4 layers"):
        remove_layers(model, [1], scores=[0.1, 0.2, 0.3])
    assert len(remove_layers(model, np.array([1, 3])).model.layers) == 2
    assert len(remove_layers(model, torch.tensor([0])).model.layers) == 3


def test_gpt2_with_layer_index_scaling_is_refused():
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                          scale_attn_by_inverse_layer_idx=True)
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="scales attention by 1/\\(layer_idx \\+ 1\\)"):
        remove_layers(model, [0])


# ------------------------------------------------------------------- the bundled model


@pytest.mark.slow
def test_bundled_model_pruned_by_bi_generates_and_round_trips(smollm2, tmp_path):
    from shortgpt_lite import block_influence, layers_to_remove, load_text, token_windows

    model, tokenizer = smollm2
    windows = token_windows(tokenizer, load_text("wikipedia"), seq_len=128, max_windows=4)
    scores = block_influence(model, windows, batch_size=4, progress=False)
    plan = layers_to_remove(scores, 8)
    pruned = remove_layers(model, plan, scores=scores, metric="bi")
    assert len(model.model.layers) == 30 and pruned.config.num_hidden_layers == 22

    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with_cache = _generate(pruned, prompt, 12, use_cache=True)
    assert torch.equal(with_cache, _generate(pruned, prompt, 12, use_cache=False))
    assert torch.equal(with_cache, _greedy_by_hand(model, prompt, plan, 12))

    pruned.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(windows[:1]).logits, pruned(windows[:1]).logits)
    record = getattr(reloaded.config, REMOVAL_RECORD)
    assert record["removed_layers"] == plan
    assert record["steps"][0]["scores"] == pytest.approx(scores.tolist())
