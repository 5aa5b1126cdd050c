"""int8 dynamic quantization of the block linears: close to the float model, smaller,
and silent about torch's deprecation of torch.ao."""

import warnings

import pytest
import torch

from shortgpt_lite.costs import serialized_bytes
from shortgpt_lite.quantize import is_quantized, quantize_int8
from tiny import tiny_llama


def _tiny_llama(layers=2):
    return tiny_llama(vocab_size=257, layers=layers, tie=True)


def test_int8_quantization_is_close_smaller_and_silent():
    model = _tiny_llama(layers=2)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize_int8(model)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]
    assert is_quantized(quantized) and not is_quantized(model)
    assert type(quantized.lm_head).__name__ == "Linear"  # tied to the embedding: kept fp32
    with torch.no_grad():
        a, b = model(ids).logits, quantized(ids).logits
    assert torch.allclose(a, b, atol=0.05 * a.abs().max())
    assert serialized_bytes(quantized) < serialized_bytes(model)
    with pytest.raises(ValueError, match="fp32"):
        quantize_int8(model.to(torch.bfloat16))
