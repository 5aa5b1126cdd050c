"""decoder_layers on every supported architecture, built tiny and random from its config.

``tiny_model`` and ``ARCHITECTURES`` are shared with the other core tests.
"""

import pytest
import torch
import transformers as T
from torch import nn

from shortgpt_lite import decoder_layers
from shortgpt_lite.layers import decoder_layers_path, num_layers, unwrap_model

VOCAB = 128
_SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _config(name: str, layers: int):
    if name == "llama":
        return T.LlamaConfig(**_SMALL, num_hidden_layers=layers)
    if name == "mistral":
        return T.MistralConfig(**_SMALL, num_hidden_layers=layers, sliding_window=8)
    if name == "qwen2":
        return T.Qwen2Config(**_SMALL, num_hidden_layers=layers)
    if name == "qwen3":
        return T.Qwen3Config(**_SMALL, num_hidden_layers=layers, head_dim=8)
    if name == "gemma":
        return T.GemmaConfig(**_SMALL, num_hidden_layers=layers, head_dim=8)
    if name == "gemma2":
        return T.Gemma2Config(**_SMALL, num_hidden_layers=layers, head_dim=8, sliding_window=4)
    if name == "gemma3":
        # the default layer_types: five sliding-window layers, then one global
        return T.Gemma3TextConfig(**_SMALL, num_hidden_layers=layers, head_dim=8, sliding_window=4)
    if name == "phi3":
        return T.Phi3Config(**_SMALL, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    if name == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2)
    if name == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=256,
                           word_embed_proj_dim=32)
    if name == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=256)
    if name == "falcon":  # Falcon's blocks return a tuple (hidden, attention weights)
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                              num_attention_heads=4)
    if name == "falcon_alibi":
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                              num_attention_heads=4, alibi=True)
    raise KeyError(name)


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2",
                 "opt", "gpt_neox", "falcon", "falcon_alibi"]

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


def tiny_model(name: str = "llama", layers: int = 4, seed: int = 0):
    """A randomly initialised causal LM of architecture ``name``, in eval mode."""
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(_config(name, layers)).eval()


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
    text = _config("gemma3", 2)
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
