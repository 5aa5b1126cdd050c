"""ShortGPT-gen: skip the removed layers while the prompt is read, run them while decoding.

The ShortGPT authors' generation mode (``shortgpt-gen/`` in icip-cas/ShortGPT, their
``ShortgptLlamaModel.forward``) keeps every layer and decides per forward call:

* a call with more than one token (reading the prompt) passes the hidden state through
  each listed layer unchanged. With a KV cache, the layer still writes the prompt's keys
  and values: ``k_proj`` and ``v_proj`` of its own ``input_layernorm`` of the state it
  receives, with no query, attention or MLP. Their code passes the rotary tables to the
  cache but never applies them, so these prompt keys are cached *without* rotary
  position embedding, while the keys of generated tokens are rotated as usual;
* a call with one token (each decoding step) runs every layer in full.

So the first token comes from the pruned network, the prefill is as cheap as after
removal, and decoding costs what the dense model costs. :func:`shortgpt_gen` reproduces
that behaviour, the unrotated prompt keys included; ``rotate_prompt_keys=True`` rotates
them as the dense model's attention would, to show what the difference costs.

It is a mode of running the model, not a change of its weights: ``save_pretrained``
writes the dense model, and a reloaded model needs :func:`shortgpt_gen` again.
"""

from __future__ import annotations

import copy
import types

from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .layers import decoder_layers, text_config, unwrap_model
from .removal import check_layers

__all__ = ["SUPPORTED", "shortgpt_gen"]

# Blocks with input_layernorm, self_attn.{k,v}_proj and rotary embeddings applied in
# attention, as the authors' Llama code assumes.
SUPPORTED = ("llama", "mistral", "qwen2")


def _prefill_skip(block: nn.Module, hidden_states, *args, **kwargs):
    """The forward of a listed block, bound to it (so that a deep copy of the model binds
    it to the copy)."""
    if hidden_states.shape[1] == 1:  # a decoding step: the layer runs
        return type(block).forward(block, hidden_states, *args, **kwargs)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:  # the prompt's keys and values, from a projection only
        attn = block.self_attn
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        x = block.input_layernorm(hidden_states)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        if block.rotate_prompt_keys:  # as the block's own attention would
            _, keys = apply_rotary_pos_emb(keys, keys, *kwargs["position_embeddings"])
        cache.update(keys, values, attn.layer_idx)
    return hidden_states


def shortgpt_gen(model: nn.Module, layers, *, rotate_prompt_keys: bool = False,
                 inplace: bool = False) -> nn.Module:
    """``model`` with ``layers`` (0-based) skipped while reading a prompt and run while
    decoding, as the ShortGPT authors' generation mode does (see the module docstring).

    With ``use_cache=False`` every call reads more than one token, so the model computes
    what ``remove_layers(model, layers)`` computes. The model is copied unless
    ``inplace=True``; ``model.shortgpt_gen_layers`` lists the skipped layers.
    ``ValueError`` for an architecture other than Llama, Mistral or Qwen2 (the layout the
    authors' code assumes), or a bad list of layers.
    """
    model_type = text_config(model).model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"ShortGPT-gen caches a skipped layer's prompt keys from its k_proj "
                         f"and v_proj, as the authors' Llama code does; it supports "
                         f"{', '.join(SUPPORTED)}, not {model_type!r}. Use remove_layers "
                         "to remove the layers outright.")
    layers = check_layers(layers, len(decoder_layers(model)))
    if not inplace:
        model = copy.deepcopy(model)
    blocks = decoder_layers(model)
    for i in layers:
        blocks[i].rotate_prompt_keys = rotate_prompt_keys
        blocks[i].forward = types.MethodType(_prefill_skip, blocks[i])
    unwrap_model(model).shortgpt_gen_layers = list(layers)
    return model
