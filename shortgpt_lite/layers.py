"""The decoder blocks of any Hugging Face causal LM: find them, end a pass after one, swap
one's forward.

Depth pruning works on the sequence of decoder blocks ``x_{i+1} = x_i + f_i(x_i)``.
Every architecture keeps that sequence in an ``nn.ModuleList``, but under a different
name: ``model.layers`` (Llama, Mistral, Qwen, Gemma, Phi-3), ``transformer.h`` (GPT-2,
Falcon), ``model.decoder.layers`` (OPT), ``gpt_neox.layers`` (Pythia), and one level
deeper in multimodal models. :func:`decoder_layers` finds it, through peft and
accelerate wrappers, so no other module needs to know where a model keeps its blocks.

Two context managers change what a block does for the length of a ``with``, and are the
only places this library does so: :func:`stop_after` ends a forward pass once a block
has run (the statistics are collected; the final norm and the LM head are not needed),
and :func:`replaced_forward` swaps a block's ``forward`` and restores it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["decoder_layers", "decoder_layers_path", "num_layers", "replaced_forward",
           "sliced_linear", "stop_after", "text_config", "unwrap_model"]

# Where known architectures keep their blocks, most common first.
_KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo, ...
    "transformer.h",  # GPT-2, Falcon, GPT-J, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # Gemma-3 and other multimodal *ForConditionalGeneration
    "language_model.model.layers",
    "transformer.layers",
    "model.transformer.h",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside peft, DistributedDataParallel and torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()  # peft: PeftModel -> LoraModel -> the HF model
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module  # DataParallel / DistributedDataParallel
    return model


def text_config(model: nn.Module):
    """The config of the model's language part (the whole config for a text-only model),
    or None if the model has no config."""
    config = getattr(unwrap_model(model), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int | None:
    """``num_hidden_layers`` of the model's text config, or None if it has no config."""
    config = text_config(model)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def decoder_layers_path(model: nn.Module) -> str:
    """The dotted name of the decoder-block ``ModuleList`` inside the unwrapped model,
    e.g. ``"model.layers"`` for Llama or ``"transformer.h"`` for GPT-2."""
    inner = unwrap_model(model)
    n = num_layers(inner)
    for path in _KNOWN_PATHS:
        found = _get(inner, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (n is None or len(found) == n):
            return path
    # An architecture we have not listed: the one ModuleList of num_hidden_layers blocks
    # whose blocks carry an attention module with a layer_idx (every HF decoder does,
    # for its KV cache). Vision towers of multimodal models have no cache, so no layer_idx.
    candidates = []
    for name, module in inner.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0
                and (n is None or len(module) == n)
                and any(hasattr(sub, "layer_idx") for sub in module[0].modules())):
            candidates.append(name)
    if len(candidates) == 1:
        return candidates[0]
    what = type(model).__name__ + (f" (wrapping {type(inner).__name__})" if inner is not model else "")
    detail = (f"several candidates: {', '.join(candidates)}" if candidates
              else f"no nn.ModuleList of {n} blocks with a layer_idx was found")
    raise LookupError(
        f"decoder_layers does not know where {what} keeps its decoder blocks ({detail}). "
        f"Pass a Hugging Face causal LM such as LlamaForCausalLM, or add the attribute path "
        f"of its block list to _KNOWN_PATHS in shortgpt_lite/layers.py.")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM, in order, as the model's own
    ``nn.ModuleList`` (so deleting from it deletes from the model).

    Works on Llama, Mistral, Qwen2, Qwen3, Gemma/Gemma2/Gemma3, Phi-3, GPT-2, OPT,
    GPT-NeoX and Falcon, on the same models wrapped by peft, and on models split over
    devices by accelerate's ``device_map`` (the blocks stay where accelerate put them).
    Raises ``LookupError`` naming the model class when it cannot find them.
    """
    return _get(unwrap_model(model), decoder_layers_path(model))


class _StopForward(Exception):
    """Raised by :func:`stop_after`'s hook and caught by its ``with``."""


def _raise_stop(module, args, output):
    raise _StopForward


@contextmanager
def stop_after(block: nn.Module):
    """A forward pass run inside the ``with`` ends as soon as ``block`` has returned.

    Hooks registered on ``block`` before this one still see its output. The model call
    returns nothing; what the pass was for is whatever those hooks collected::

        with stop_after(decoder_layers(model)[-1]):
            model(**inputs)
    """
    handle = block.register_forward_hook(_raise_stop)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def replaced_forward(block: nn.Module, forward: Callable):
    """Inside the ``with``, ``block(...)`` calls ``forward`` instead of its own method;
    the block's hooks still run. Afterwards the block is as it was, including a
    ``forward`` that accelerate or peft set on the instance."""
    had_own = "forward" in block.__dict__
    own = block.__dict__.get("forward")
    block.forward = forward
    try:
        yield block
    finally:
        if had_own:
            block.forward = own
        else:
            del block.forward


def sliced_linear(linear: nn.Linear, keep: torch.Tensor, dim: int, pad: int = 0) -> nn.Linear:
    """A new ``nn.Linear`` holding the output features (``dim=0``: weight rows and their
    biases) or input features (``dim=1``: weight columns) of ``linear`` listed in ``keep``,
    in order, followed by ``pad`` zero features: how physical pruning deletes MLP neurons
    and attention heads."""
    keep = keep.to(linear.weight.device)
    w = linear.weight.detach().index_select(dim, keep)
    if pad:
        shape = list(w.shape)
        shape[dim] = pad
        w = torch.cat([w, w.new_zeros(shape)], dim=dim)
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device,
                    dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.detach()
        if dim == 0:
            b = torch.cat([b[keep], b.new_zeros(pad)])
        new.bias.data.copy_(b)
    return new
