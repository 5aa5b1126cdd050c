"""decoder_layers on every supported architecture, built tiny and random from its config.

"""

import pytest
import transformers as T
from torch import nn

from shortgpt_lite import decoder_layers
from shortgpt_lite.layers import decoder_layers_path, num_layers, unwrap_model
from tiny import ARCHITECTURES, tiny_config, tiny_model

EXPECTED = {
    "llama": ("LlamaForCausalLM", "model.layers"),
    "mistral": ("MistralForCausalLM", "model.layers"),
    "qwen2": ("Qwen2ForCausalLM", "model.layers"),
    "qwen3": ("Qwen3ForCausalLM", "model.layers"),
    "gemma": ("GemmaForCausalLM", "model.layers"),
    "gemma2": ("Gemma2ForCausalLM", "model.layers"),
    "gemma3": ("Gemma3ForCausalLM", "model.layers"),
    "phi3": ("Phi3ForCausalLM", "model.layers"),
    "gpt2": ("GPT2LMHeadModel", "transformer.h"),
    "opt": ("OPTForCausalLM", "model.decoder.layers"),
    "gpt_neox": ("GPTNeoXForCausalLM", "gpt_neox.layers"),
    "falcon": ("FalconForCausalLM", "transformer.h"),
    "falcon_alibi": ("FalconForCausalLM", "transformer.h"),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_decoder_layers_finds_the_blocks(name):
    model = tiny_model(name, layers=3)
    cls, path = EXPECTED[name]
    assert type(model).__name__ == cls
    blocks = decoder_layers(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 3
    assert decoder_layers_path(model) == path
    assert num_layers(model) == 3
    # the very list the model iterates over, not a copy
    assert blocks is model.get_submodule(path)


def test_decoder_layers_through_peft():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert unwrap_model(wrapped) is model
    blocks = decoder_layers(wrapped)
    assert blocks is model.model.layers
    assert any("lora_A" in name for name, _ in blocks[0].named_modules())


def test_decoder_layers_with_accelerate_device_map():
    from accelerate import dispatch_model

    model = tiny_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}}
    dispatched = dispatch_model(model, device_map=device_map, force_hooks=True)
    blocks = decoder_layers(dispatched)
    assert len(blocks) == 4
    assert hasattr(blocks[0], "_hf_hook")  # accelerate's device hooks are in place


def test_decoder_layers_on_gemma3_multimodal_wrapper():
    text = tiny_config("gemma3", 2)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=16, patch_size=8)
    config = T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                            mm_tokens_per_image=4)
    model = T.Gemma3ForConditionalGeneration(config).eval()
    # the vision tower also has a 2-block ModuleList; the language model's must be chosen
    assert decoder_layers_path(model) == "model.language_model.layers"


class _NotALanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unknown_model_names_its_class():
    with pytest.raises(LookupError, match="_NotALanguageModel"):
        decoder_layers(_NotALanguageModel())


# ------------------------------------------------------------------- changing a forward


def test_stop_after_ends_the_pass_once_the_block_has_run():
    import torch

    from shortgpt_lite.layers import stop_after

    model = tiny_model("llama")
    blocks = decoder_layers(model)
    ran = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))
    model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    with stop_after(blocks[1]):
        assert model(torch.ones(1, 4, dtype=torch.long)) is None
    assert ran == [0, 1]  # hooks registered before still see block 1's output
    assert all(len(b._forward_hooks) == 1 for b in blocks)  # its own hook is gone
    model(torch.ones(1, 4, dtype=torch.long))
    assert ran[-1] == "lm_head"
    with pytest.raises(RuntimeError, match="other"), stop_after(blocks[0]):
        raise RuntimeError("other errors pass through")


def test_replaced_forward_restores_the_block_even_after_an_error():
    from shortgpt_lite.layers import replaced_forward

    model = tiny_model("llama")
    plain, patched = decoder_layers(model)[0], decoder_layers(model)[1]
    def own(*args, **kwargs):
        return "accelerate's forward"

    patched.forward = own
    for block in (plain, patched):
        with pytest.raises(ValueError), replaced_forward(block, lambda *a, **k: "stub"):
            assert block.forward() == "stub"
            raise ValueError
    assert "forward" not in plain.__dict__
    assert patched.forward is own
