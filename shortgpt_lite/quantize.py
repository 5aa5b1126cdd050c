"""int8 quantization of the linear layers: dynamic for CPU inference, and weight-only.

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

:func:`quantize_weights_int8` rounds the weights alone to an int8 grid, one scale per output
row (per channel, as GPTQ and LLM.int8() do for weights) or per tensor, and leaves the
activations in float. Set beside dynamic int8, it separates the error of the weights from
that of the activations. It is simulated quantization: the rounded weights stay in the
model's dtype, so it measures int8 weights' quality, not their size or speed.

A dynamically quantized model no longer saves with ``save_pretrained`` as a plain transformers
model; :func:`shortgpt_lite.costs.serialized_bytes` measures its size as a ``torch.save``
state dict.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .layers import decoder_layers, unwrap_model

__all__ = ["cpu_fp32_copy", "int8_weights", "is_quantized", "quantize_int8",
           "quantize_weights_int8"]

_DEPRECATIONS = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
)


def cpu_fp32_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU in fp32, what :func:`quantize_int8` quantizes, made
    tensor by tensor: nothing is copied on the model's own device, so a model that fills
    its GPU can still be copied. Tied weights stay tied; integer buffers keep their dtype."""
    memo: dict = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in memo:
            moved = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype,
                                  copy=True)
            memo[id(t)] = nn.Parameter(moved, t.requires_grad) \
                if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(model, memo)  # every tensor is in memo: deepcopy copies no tensor


def _check_per(per: str) -> None:
    if per not in ("tensor", "channel"):
        raise ValueError(f"per={per!r}: choose 'tensor' (one scale per weight matrix) or "
                         "'channel' (one scale per output row).")


def quantize_int8(model: nn.Module, *, per: str = "tensor", include_lm_head: bool = False,
                  inplace: bool = False) -> nn.Module:
    """int8 dynamic quantization of every ``nn.Linear`` in the decoder blocks (and the LM
    head if ``include_lm_head``: off by default because small models tie it to the
    embedding, and quantizing it would store a second, int8 copy next to the fp32 one).

    Weights: :math:`W_q = \\mathrm{round}(W / s) + z` in int8, with one scale ``s`` per
    tensor (``per="tensor"``, torch's default) or per output row (``per="channel"``);
    activations are quantized per batch at run time. CPU only. Returns the quantized model
    (a deep copy unless ``inplace=True``).
    """
    _check_per(per)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU; quantize a CPU copy, "
                         "sgl.cpu_fp32_copy(model).")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("int8 dynamic quantization expects an fp32 model; load it with "
                         "dtype=torch.float32 or quantize sgl.cpu_fp32_copy(model).")
    if not inplace:
        model = copy.deepcopy(model)
    targets = list(decoder_layers(model))
    if include_lm_head and model.get_output_embeddings() is not None:
        targets.append(model.get_output_embeddings())
    qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per == "channel"
               else torch.ao.quantization.default_dynamic_qconfig)
    spec = {nn.Linear: qconfig}
    with warnings.catch_warnings():
        for message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message)
        for target in targets:
            # quantize_dynamic swaps children only, so pass each block (or wrap the head)
            if isinstance(target, nn.Linear):
                holder = nn.Module()
                holder.head = target
                torch.ao.quantization.quantize_dynamic(holder, spec, dtype=torch.qint8,
                                                       inplace=True)
                model.set_output_embeddings(holder.head)
            else:
                torch.ao.quantization.quantize_dynamic(target, spec, dtype=torch.qint8,
                                                       inplace=True)
    return model


def int8_weights(weight: torch.Tensor, per: str = "channel") -> torch.Tensor:
    """``weight`` rounded to a symmetric int8 grid and scaled back:
    :math:`\\hat W = s\\,\\mathrm{clamp}(\\mathrm{round}(W / s), -127, 127)` with
    :math:`s = \\max|W| / 127` over each output row (``per="channel"``) or the whole matrix
    (``per="tensor"``). Computed in float32, returned in ``weight``'s dtype."""
    _check_per(per)
    w = weight.detach().float()
    peak = w.abs().amax(dim=1, keepdim=True) if per == "channel" else w.abs().amax()
    scale = (peak / 127).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row stays zero
    return ((w / scale).round().clamp(-127, 127) * scale).to(weight.dtype)


def quantize_weights_int8(model: nn.Module, *, per: str = "channel",
                          include_lm_head: bool = False, inplace: bool = False) -> nn.Module:
    """Weight-only int8: every ``nn.Linear`` weight of the decoder blocks (and the LM head
    if ``include_lm_head``) replaced by :func:`int8_weights`, activations untouched. Runs on
    any device and dtype. The model records ``per`` in
    ``config.shortgpt_lite_quantization``. Returns a deep copy unless ``inplace=True``."""
    _check_per(per)
    head = model.get_output_embeddings() if include_lm_head else None
    head = head if isinstance(head, nn.Linear) else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        raise ValueError("the LM head shares its weight with the input embedding; rounding it "
                         "would round the embedding too. Leave include_lm_head=False.")
    if not inplace:
        model = copy.deepcopy(model)
    linears = [m for block in decoder_layers(model) for m in block.modules()
               if isinstance(m, nn.Linear)]
    if head is not None:
        linears.append(model.get_output_embeddings())  # the copy's head
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(int8_weights(linear.weight, per))
    unwrap_model(model).config.shortgpt_lite_quantization = {
        "method": "int8 weight-only, round to nearest", "per": per, "lm_head": include_lm_head}
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a dynamically quantized linear layer."""
    return any(type(m).__name__ == "DynamicQuantizedLinear" or
               "quantized" in type(m).__module__ for m in model.modules())
