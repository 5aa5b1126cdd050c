"""What a model costs: parameters, bytes, peak memory, and the one prefill/decode timer."""

import copy
import warnings

import pandas as pd
import pytest
import torch

import shortgpt_lite.costs as costs
from shortgpt_lite.costs import (
    cost,
    param_counts,
    prefill_and_decode,
    serialized_bytes,
    timed,
)
from shortgpt_lite.quantize import quantize_int8
from tiny import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=257, layers=2, max_positions=128), None


def test_cost_counts_parameters_and_measures_speed(tiny):
    model, _ = tiny
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        sparse.model.layers[0].mlp.down_proj.weight.zero_()
    result = cost(model, seq_len=16, decode_tokens=4, repeats=2)
    total = sum(p.numel() for p in model.parameters())
    assert result["params_total"] == total == result["params_nonzero"]
    assert result["weights_bytes"] >= 4 * total
    # safetensors adds only a JSON header to the raw bytes
    assert 0 < result["safetensors_bytes"] - 4 * total < 64_000
    assert result["peak_memory_bytes"] >= result["weights_bytes"]
    assert result["prefill_seconds"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["prefill_tokens"] == 16 and result["layers"] == 2

    table = cost({"dense": model, "sparse": sparse}, seq_len=16, decode_tokens=4, repeats=1)
    assert isinstance(table, pd.DataFrame) and list(table.index) == ["dense", "sparse"]
    assert table.loc["dense", "params_nonzero"] - table.loc["sparse", "params_nonzero"] == 64 * 32
    with pytest.raises(ValueError, match="positions"):
        cost(model, seq_len=128, decode_tokens=4)


def test_cost_without_repeats_measures_memory_and_times_nothing(tiny, monkeypatch):
    model, _ = tiny
    import shortgpt_lite.costs as costs

    def no_timing(*args, **kwargs):
        raise AssertionError("repeats=0 must not time the models")

    monkeypatch.setattr(costs, "speed_runs", no_timing)
    table = cost({"dense": model}, seq_len=16, decode_tokens=4, repeats=0)
    assert table.loc["dense", "peak_memory_bytes"] >= table.loc["dense", "weights_bytes"] > 0
    assert not {"prefill_seconds", "decode_tokens_per_s", "timing_repeats"} & set(table.columns)
    with pytest.raises(ValueError, match="repeats=-1"):
        cost(model, seq_len=16, decode_tokens=4, repeats=-1)


def test_cost_decodes_without_deprecation_warnings(tiny, capfd):
    """The decode loop passes the KV cache under the name this transformers version uses."""
    from transformers.utils import logging as hf_logging

    model, _ = tiny
    hf_logging.get_logger("transformers").warning_once.cache_clear()  # warnings print once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cost(model, seq_len=8, decode_tokens=3, repeats=1)
    messages = [str(w.message) for w in caught] + [capfd.readouterr().err]
    assert not [m for m in messages if "deprecated" in m], messages


def test_param_counts_count_tied_weights_once_and_zeros_apart():
    tied = tiny_llama(vocab_size=257, layers=2, tie=True)
    total, nonzero = param_counts(tied)
    assert total == sum(p.numel() for p in tied.parameters()) == nonzero
    untied = tiny_llama(vocab_size=257, layers=2, tie=False)
    assert param_counts(untied)[0] - total == 257 * 32  # a second 257 x 32 head
    with torch.no_grad():
        tied.model.layers[0].mlp.up_proj.weight[:3].zero_()
    assert param_counts(tied) == (total, total - 3 * 32)


def test_one_timer_for_float_and_int8_models(tiny):
    model, _ = tiny
    for m in (model, quantize_int8(model)):
        speed = prefill_and_decode(m, seq_len=8, decode_tokens=3, repeats=2)
        assert set(speed) == {"prefill_seconds", "prefill_spread", "decode_tokens_per_s",
                              "decode_spread", "timing_repeats"}
        assert speed["prefill_seconds"] > 0 and speed["decode_tokens_per_s"] > 0
        assert speed["prefill_spread"] >= 0 and speed["timing_repeats"] == 2
    with pytest.raises(ValueError, match="at least 1"):
        prefill_and_decode(model, seq_len=8, decode_tokens=0)
    with pytest.raises(ValueError, match="at least 1"):
        prefill_and_decode(model, seq_len=8, repeats=0)
    assert serialized_bytes(quantize_int8(model)) < serialized_bytes(model)


def test_timed_waits_for_the_device_and_measures_the_call(monkeypatch):
    synced = []
    monkeypatch.setattr(costs, "synchronize", lambda device: synced.append(device))
    device = torch.device("cpu")
    assert timed(lambda: sum(range(10_000)), device) > 0
    assert synced == [device, device]


@pytest.mark.parametrize("tie", [False, True])
def test_param_breakdown_adds_up_and_sees_a_tied_head(tie):
    from shortgpt_lite.costs import param_breakdown
    from tiny import tiny_llama

    model = tiny_llama(layers=3, tie=tie)
    b = param_breakdown(model)
    assert b["embedding"] == 128 * 32 and b["head"] == (0 if tie else 128 * 32)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert b["blocks"] == 3 * block and b["per_block"] == block
    assert b["other"] == 32  # the final RMSNorm
    assert b["embedding"] + b["head"] + b["blocks"] + b["other"] == b["total"]
    assert b["total"] == sum(p.numel() for p in model.parameters())


def test_models_are_warmed_up_first_then_timed_in_alternating_order(monkeypatch):
    """No model is favoured by when it runs: all warm up before any is timed, and each
    repeat reverses the order of the one before."""
    calls = []
    timings = {"a": [9.0, 1.0, 2.0, 3.0, 4.0], "b": [9.0, 2.0, 2.0, 2.0, 2.0],
               "c": [9.0, 5.0, 4.0, 6.0, 4.0]}

    def probe(model, seq_len, decode_tokens, seed):
        def once():
            calls.append(model)
            t = timings[model][sum(c == model for c in calls) - 1]
            return t, 10 / t
        return once

    monkeypatch.setattr(costs, "_speed_probe", probe)
    runs = costs.speed_runs({"a": "a", "b": "b", "c": "c"}, repeats=4)
    assert calls[:3] == ["a", "b", "c"]  # the untimed warm-ups, before any timed run
    assert calls[3:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert 9.0 not in runs["prefill_seconds"].tolist()  # warm-ups are not reported
    assert runs.groupby("model")["position"].mean().nunique() == 1  # every place alike
    summary = costs.summarise_speeds(runs)
    assert summary.loc["a", "prefill_seconds"] == 1.0 and summary.loc["c", "prefill_seconds"] == 4.0
    assert summary.loc["a", "prefill_spread"] == pytest.approx(3.0)  # (4 - 1) / 1
    assert summary.loc["b", "prefill_spread"] == 0.0
    assert summary.loc["c", "decode_tokens_per_s"] == pytest.approx(10 / 4)
    assert summary.loc["c", "decode_spread"] == pytest.approx((10 / 4) / (10 / 6) - 1)
    with pytest.raises(ValueError, match="No models"):
        costs.speed_runs({})
