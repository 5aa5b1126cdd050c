"""layer_importance metrics and layers_to_remove plans."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from shortgpt_lite import (
    METRICS,
    angular_distance,
    block_influence,
    decoder_layers,
    layer_importance,
    layers_to_remove,
    remove_layers,
    skip_layer,
)
from shortgpt_lite.hooks import layer_statistics
from tiny import VOCAB, random_windows, tiny_model


def _windows(n=4, length=16, seed=2):
    return random_windows(n, length, seed)


def _perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                    ids[:, 1:].reshape(-1)).item())


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_gives_one_finite_score_per_layer(metric):
    scores = layer_importance(tiny_model("llama"), _windows(), metric, batch_size=2, progress=False)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


def test_order_metrics():
    model = tiny_model("llama", layers=6)
    assert layer_importance(model, None, "sequential").tolist() == [0, 1, 2, 3, 4, 5]
    assert layer_importance(model, None, "reverse").tolist() == [5, 4, 3, 2, 1, 0]
    assert layers_to_remove(layer_importance(model, None, "reverse"), 2) == [4, 5]
    a = layer_importance(model, None, "random", seed=3)
    assert sorted(a.tolist()) == [0, 1, 2, 3, 4, 5]
    assert torch.equal(a, layer_importance(model, None, "random", seed=3))
    assert not torch.equal(a, layer_importance(model, None, "random", seed=4))


def test_statistic_metrics_match_the_hooked_pass():
    model, ids = tiny_model("llama"), _windows()
    torch.testing.assert_close(layer_importance(model, ids, "bi", progress=False),
                               block_influence(model, ids, progress=False))
    torch.testing.assert_close(layer_importance(model, ids, "angular", progress=False),
                               angular_distance(model, ids, max_n=1, progress=False)[0])
    torch.testing.assert_close(
        layer_importance(model, ids, "angular", tokens="all", progress=False),
        layer_statistics(model, ids, angular=1, pair_tokens="all", progress=False)
        .angular_distance[0])
    torch.testing.assert_close(
        layer_importance(model, ids, "relative_magnitude", progress=False),
        layer_statistics(model, ids, relative_magnitude=True, progress=False).relative_magnitude)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "falcon"])
def test_ppl_equals_perplexity_of_the_model_without_that_layer(name):
    model, ids = tiny_model(name), _windows()
    scores = layer_importance(model, ids, "ppl", batch_size=3, progress=False)
    expected = [_perplexity(remove_layers(model, [i]), ids) for i in range(4)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32), rtol=1e-5,
                               atol=0)
    # and the model is whole again afterwards
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
    torch.testing.assert_close(_perplexity(model, ids), _perplexity(copy.deepcopy(model), ids))


def test_skip_layer_restores_an_accelerate_forward():
    from accelerate import dispatch_model

    model = tiny_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}}
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    layer = decoder_layers(model)[1]
    hooked_forward = layer.__dict__["forward"]
    with skip_layer(layer):
        assert layer.forward is not hooked_forward
    assert layer.__dict__["forward"] is hooked_forward


def test_taylor_is_sum_of_weight_times_gradient():
    model, ids = tiny_model("llama"), _windows()
    model.model.layers[0].self_attn.q_proj.weight.grad = torch.ones_like(
        model.model.layers[0].self_attn.q_proj.weight)
    scores = layer_importance(model, ids, "taylor", batch_size=3, progress=False)

    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    logits = reference(ids, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    expected = [sum((p * p.grad).abs().sum().item() for p in layer.parameters() if p.dim() >= 2)
                for layer in reference.model.layers]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32), rtol=1e-4,
                               atol=0)
    # the model's own gradients and flags are as they were
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.grad,
                       torch.ones_like(model.model.layers[0].self_attn.q_proj.weight))
    assert model.model.layers[1].mlp.up_proj.weight.grad is None
    assert all(p.requires_grad for p in model.parameters())


def test_metric_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="Unknown metric 'cosine'. Choose one of: bi"):
        layer_importance(model, _windows(), "cosine")
    with pytest.raises(ValueError, match="needs calibration data"):
        layer_importance(model, None, "bi")


def test_layers_to_remove_picks_the_lowest():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.3, 0.8])
    assert layers_to_remove(scores, 0) == []
    assert layers_to_remove(scores, 1) == [1]  # ties go to the lower index
    assert layers_to_remove(scores, 3) == [1, 3, 4]
    assert layers_to_remove([3.0, 2.0, 1.0], 2) == [1, 2]
    assert layers_to_remove(scores, 2, keep_first=2) == [3, 4]
    assert layers_to_remove(scores, 2, keep_first=2, keep_last=2) == [2, 3]


@pytest.mark.parametrize("args, message", [
    ((6,), "Cannot remove 6 of 6 layers: at least one must stay"),
    ((-1,), "k must be a non-negative integer"),
    ((1.5,), "k must be a non-negative integer"),
    ((4,), "Only 3 layers are candidates after keep_first=2 and keep_last=1"),
])
def test_layers_to_remove_errors(args, message):
    keep = {"keep_first": 2, "keep_last": 1} if "candidates" in message else {}
    with pytest.raises(ValueError, match=message):
        layers_to_remove(torch.arange(6.0), *args, **keep)


def test_layers_to_remove_refuses_nan_scores():
    with pytest.raises(ValueError, match=r"layers \[2\] are NaN"):
        layers_to_remove(torch.tensor([0.1, 0.2, float("nan")]), 1)
