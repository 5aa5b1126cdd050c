"""int8 dynamic quantization of the linear layers, for CPU inference.

ShortGPT (Men et al. 2024, arXiv 2403.03853) argues that layer removal
and quantization compose: removing layers does not make the remaining weights harder to
quantize. :func:`quantize_int8` is the quantization half of that test: every
``nn.Linear`` of the decoder blocks becomes a ``DynamicQuantizedLinear`` (int8 weights
with one scale per tensor; activations quantized on the fly per batch), which runs on
CPU through fbgemm / qnnpack.

``torch.ao.quantization.quantize_dynamic`` still works in torch 2.13 but warns that the
module is deprecated (its successor is torchao's ``quantize_``). The two deprecation
warnings it raises are silenced here, by message, and nothing else: the call is
deliberate, and the model it returns is the same.

A quantized model no longer saves with ``save_pretrained`` as a plain transformers
model; :func:`shortgpt_lite.costs.serialized_bytes` measures its size as a ``torch.save``
state dict.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .layers import decoder_layers

__all__ = ["is_quantized", "quantize_int8"]

_DEPRECATIONS = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


def quantize_int8(model: nn.Module, *, include_lm_head: bool = False,
                  inplace: bool = False) -> nn.Module:
    """int8 dynamic quantization of every ``nn.Linear`` in the decoder blocks (and the LM
    head if ``include_lm_head``: off by default because small models tie it to the
    embedding, and quantizing it would store a second, int8 copy next to the fp32 one).

    Weights: :math:`W_q = \\mathrm{round}(W / s) + z` in int8, with one scale ``s`` per
    tensor; activations are quantized per batch at run time. CPU only. Returns the
    quantized model (a deep copy unless ``inplace=True``).
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU; move the model with "
                         "model.to('cpu') first.")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("int8 dynamic quantization expects an fp32 model; load it with "
                         "dtype=torch.float32 or call model.float() first.")
    if not inplace:
        model = copy.deepcopy(model)
    targets = list(decoder_layers(model))
    if include_lm_head and model.get_output_embeddings() is not None:
        targets.append(model.get_output_embeddings())
    with warnings.catch_warnings():
        for message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message)
        for target in targets:
            # quantize_dynamic swaps children only, so pass each block (or wrap the head)
            if isinstance(target, nn.Linear):
                holder = nn.Module()
                holder.head = target
                torch.ao.quantization.quantize_dynamic(holder, {nn.Linear}, dtype=torch.qint8,
                                                       inplace=True)
                model.set_output_embeddings(holder.head)
            else:
                torch.ao.quantization.quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8,
                                                       inplace=True)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a dynamically quantized linear layer."""
    return any(type(m).__name__ == "DynamicQuantizedLinear" or
               "quantized" in type(m).__module__ for m in model.modules())
