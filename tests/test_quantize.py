"""int8 dynamic quantization of the block linears: close to the float model, smaller,
and silent about torch's deprecation of torch.ao."""

import copy
import warnings

import pytest
import torch

from shortgpt_lite.costs import serialized_bytes
from shortgpt_lite.quantize import (
    cpu_fp32_copy,
    int8_weights,
    is_quantized,
    quantize_int8,
    quantize_weights_int8,
)
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


def test_cpu_fp32_copy_copies_no_tensor_where_it_lives(monkeypatch):
    model = _tiny_llama(layers=2).to(torch.bfloat16)
    before = {n: t.clone() for n, t in model.state_dict().items()}

    def refuse(self, memo):
        raise AssertionError("a tensor was deep-copied where it lives")

    # a GPU model deep-copied whole would first be doubled on its GPU
    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    with pytest.raises(AssertionError, match="deep-copied"):
        copy.deepcopy(model)
    fp32 = cpu_fp32_copy(model)
    monkeypatch.undo()
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in fp32.parameters())
    assert fp32.lm_head.weight is fp32.model.embed_tokens.weight  # still tied
    for name, t in fp32.state_dict().items():
        assert torch.equal(t, before[name].float()), name  # bf16 to fp32 is exact
    with torch.no_grad():
        next(fp32.parameters()).add_(1.0)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.bfloat16
    again = cpu_fp32_copy(fp32)  # already CPU fp32: a copy, not the same storage
    with torch.no_grad():
        next(again.parameters()).zero_()
    assert next(fp32.parameters()).abs().sum() > 0
    assert is_quantized(quantize_int8(cpu_fp32_copy(model)))
    with pytest.raises(ValueError, match="cpu_fp32_copy"):
        quantize_int8(model)


def test_int8_weights_round_each_row_to_its_own_grid():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    w[2] *= 50  # one loud row: a per-tensor scale hands the other rows a coarse grid
    by_row = int8_weights(w, "channel")
    by_hand = torch.stack([(row / (row.abs().max() / 127)).round() * (row.abs().max() / 127)
                           for row in w])
    assert torch.allclose(by_row, by_hand, atol=1e-6)
    for row, q in zip(w, by_row):
        assert len(q.unique()) <= 255
        assert (row - q).abs().max() <= row.abs().max() / 127 / 2 + 1e-6
    by_tensor = int8_weights(w, "tensor")
    assert torch.allclose(by_tensor, (w / (w.abs().max() / 127)).round() * (w.abs().max() / 127))
    quiet = [i for i in range(6) if i != 2]
    assert (w[quiet] - by_row[quiet]).abs().mean() < (w[quiet] - by_tensor[quiet]).abs().mean() / 10
    assert torch.equal(int8_weights(torch.zeros(2, 3)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'tensor'.*'channel'"):
        int8_weights(w, "row")


def test_weight_only_int8_rounds_the_block_linears_and_keeps_the_activations():
    model = _tiny_llama(layers=2)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    rounded = quantize_weights_int8(model)
    assert not is_quantized(rounded)  # plain float linears, so it runs on any device
    before = dict(model.named_modules())
    linears = [(n, m) for n, m in rounded.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    assert linears
    for name, linear in linears:
        assert torch.equal(linear.weight, int8_weights(before[name].weight, "channel"))
        assert not torch.equal(linear.weight, before[name].weight)
    assert torch.equal(rounded.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        a, b = model(ids).logits, rounded(ids).logits
    assert torch.allclose(a, b, atol=0.02 * a.abs().max())
    assert rounded.config.shortgpt_lite_quantization["per"] == "channel"
    assert not hasattr(model.config, "shortgpt_lite_quantization")
    with pytest.raises(ValueError, match="shares its weight"):
        quantize_weights_int8(model, include_lm_head=True)


def test_per_channel_dynamic_int8_uses_a_scale_per_row():
    model = _tiny_llama(layers=1)
    per_row = quantize_int8(model, per="channel")
    linear = next(m for m in per_row.modules() if type(m).__name__ == "Linear"
                  and "quantized" in type(m).__module__)
    assert linear.weight().qscheme() == torch.per_channel_affine
    assert quantize_int8(model).model.layers[0].mlp.down_proj.weight().qscheme() \
        == torch.per_tensor_affine
    with pytest.raises(ValueError, match="'tensor'.*'channel'"):
        quantize_int8(model, per="row")
