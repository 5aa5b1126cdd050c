"""Block Influence and the other statistics of the one hooked pass."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from shortgpt_lite import (
    angular_distance,
    angular_distance_per_token,
    block_influence,
    block_influence_per_token,
    decoder_layers,
    layer_similarity,
    layer_statistics,
    relative_magnitude_per_token,
)
from shortgpt_lite.hooks import token_cosine
from tiny import ARCHITECTURES, random_windows, tiny_model


def _windows(n=3, length=12, seed=1):
    return random_windows(n, length, seed)


def _states_float64(model, ids):
    """Input and output of every block, captured by plain hooks on a float64 copy."""
    model64 = copy.deepcopy(model).double()
    pairs = []

    def grab(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        pairs.append((x.detach(), y.detach()))

    handles = [layer.register_forward_hook(grab, with_kwargs=True)
               for layer in decoder_layers(model64)]
    with torch.no_grad():
        model64(ids)
    for h in handles:
        h.remove()
    return pairs


# -------------------------------------------------- the bundled model, against float64


@pytest.mark.slow
def test_bi_matches_independent_float64_on_bundled_model(smollm2):
    from shortgpt_lite import load_text, token_windows

    model, tokenizer = smollm2
    windows = token_windows(tokenizer, load_text("wikipedia"), seq_len=128, max_windows=4)
    bi = block_influence(model, windows, batch_size=2, progress=False)

    # Independently: output_hidden_states of a float64 copy for the inputs of every layer,
    # and the last layer run by hand, because hidden_states[-1] is after the final norm.
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        states = model64(windows, output_hidden_states=True, use_cache=False).hidden_states
        n = len(model64.model.layers)
        positions = torch.arange(windows.shape[1]).unsqueeze(0)
        rope = model64.model.rotary_emb(states[n - 1], positions)
        last_out = model64.model.layers[-1](states[n - 1], attention_mask=None,
                                            position_embeddings=rope, position_ids=positions)
    outputs = list(states[1:n]) + [last_out]
    expected = torch.stack([1 - F.cosine_similarity(states[i], outputs[i], dim=-1).mean()
                            for i in range(n)])
    assert bi.shape == (30,) and bi.dtype == torch.float32
    torch.testing.assert_close(bi.double(), expected, atol=2e-5, rtol=1e-4)
    # comparing the last layer with the final norm's output would give something else
    post_norm = 1 - F.cosine_similarity(states[n - 1], states[n], dim=-1).mean()
    assert abs(float(post_norm) - float(bi[-1])) > 1e-3


# ------------------------------------------------------------- tiny models, every detail


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_statistic_matches_float64_states(name):
    model = tiny_model(name)
    ids = _windows()
    stats = layer_statistics(model, ids, batch_size=2, relative_magnitude=True, similarity=True,
                             angular=4, pair_tokens="all", progress=False)
    pairs = _states_float64(model, ids)
    xs = [pairs[0][0]] + [y for _, y in pairs]
    cos = [[F.cosine_similarity(a, b, dim=-1) for b in xs] for a in xs]
    bi = torch.stack([1 - F.cosine_similarity(x, y, dim=-1).mean() for x, y in pairs])
    rm = torch.stack([((y - x).norm(dim=-1) / y.norm(dim=-1)).mean() for x, y in pairs])
    sim = torch.tensor([[c.mean().item() for c in row] for row in cos])
    ang = torch.full((4, 4), math.nan, dtype=torch.float64)
    for n in range(1, 5):
        for start in range(5 - n):
            ang[n - 1, start] = (torch.arccos(cos[start][start + n].clamp(-1, 1)) / math.pi).mean()
    torch.testing.assert_close(stats.block_influence.double(), bi, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.relative_magnitude.double(), rm, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.layer_similarity.double(), sim.double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.angular_distance.double(), ang, atol=1e-6, rtol=1e-5,
                               equal_nan=True)
    assert stats.tokens == ids.numel()


def test_similarity_and_angular_are_consistent_with_bi():
    model = tiny_model("llama")
    ids = _windows()
    bi = block_influence(model, ids, progress=False)
    sim = layer_similarity(model, ids, progress=False)
    assert sim.shape == (5, 5)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(5))
    torch.testing.assert_close(1 - sim.diagonal(1), bi, atol=1e-6, rtol=1e-5)
    ang = angular_distance(model, ids, progress=False)
    assert ang.shape == (4, 4)
    assert torch.isnan(ang[3, 1:]).all() and not torch.isnan(ang[3, 0])


def test_angular_over_last_token_uses_the_last_real_token():
    model = tiny_model("llama")
    ids = _windows()
    last = angular_distance(model, ids, max_n=2, tokens="last", progress=False)
    pairs = _states_float64(model, ids)
    xs = [pairs[0][0]] + [y for _, y in pairs]
    expected = torch.stack([(torch.arccos(F.cosine_similarity(xs[i][:, -1], xs[i + 1][:, -1],
                                                              dim=-1).clamp(-1, 1)) / math.pi).mean()
                            for i in range(4)])
    torch.testing.assert_close(last[0].double(), expected, atol=1e-6, rtol=1e-5)
    # right padding after each row's end: the last real token is still the one compared
    padded = torch.cat([ids, torch.zeros_like(ids[:, :3])], dim=1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, -3:] = False
    batch = [{"input_ids": padded, "attention_mask": mask}]
    torch.testing.assert_close(angular_distance(model, batch, max_n=2, tokens="last",
                                                progress=False), last, atol=1e-5, rtol=1e-4,
                               equal_nan=True)


def _rows_of_different_lengths(ids):
    """Three unpadded sequences of different lengths, each its own batch."""
    return [ids[i:i + 1, : ids.shape[1] - 2 * i] for i in range(ids.shape[0])]


def _padded(rows, side, extra=3, pad_id=0):
    """The same sequences as one batch padded on one side to a common width."""
    width = max(r.shape[1] for r in rows) + extra
    ids, masks = [], []
    for r in rows:
        pad = torch.full((width - r.shape[1],), pad_id)
        real, none = torch.ones(r.shape[1], dtype=torch.long), torch.zeros(len(pad), dtype=torch.long)
        ids.append(torch.cat([pad, r[0]] if side == "left" else [r[0], pad]))
        masks.append(torch.cat([none, real] if side == "left" else [real, none]))
    return [{"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}]


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "opt", "gpt_neox", "falcon_alibi"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_the_statistics(name, side):
    model = tiny_model(name)
    rows = _rows_of_different_lengths(_windows())
    options = {"relative_magnitude": True, "similarity": True, "angular": 2, "progress": False}
    for tokens in ("all", "last"):
        plain = layer_statistics(model, rows, pair_tokens=tokens, **options)
        padded = layer_statistics(model, _padded(rows, side), pair_tokens=tokens, **options)
        assert padded.tokens == plain.tokens == sum(r.numel() for r in rows)
        torch.testing.assert_close(padded.block_influence, plain.block_influence,
                                   atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(padded.relative_magnitude, plain.relative_magnitude,
                                   atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(padded.layer_similarity, plain.layer_similarity,
                                   atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(padded.angular_distance, plain.angular_distance,
                                   atol=2e-6, rtol=1e-5, equal_nan=True)


def test_fp16_massive_activations_give_no_nan():
    model = tiny_model("llama")
    with torch.no_grad():
        # one "massive activation" dimension: 400² · 1 already exceeds fp16's 65504
        model.model.embed_tokens.weight[:, 0] = 400.0
    ids = _windows()
    reference = block_influence(model, ids, progress=False)
    half = copy.deepcopy(model).half()
    x, _ = _states_float64(model, ids)[0]
    naive = (x.half() * x.half()).sum(-1)
    assert torch.isinf(naive).all()  # what an fp16 cosine would run into
    for dtype in (torch.float16, torch.bfloat16):
        bi = block_influence(half.to(dtype), ids, progress=False)
        assert torch.isfinite(bi).all(), dtype
        torch.testing.assert_close(bi, reference, atol=2e-2, rtol=0)


def test_data_forms_and_batch_sizes_agree():
    model = tiny_model("llama")
    ids = _windows(n=4)
    mask = torch.ones_like(ids)
    expected = block_influence(model, ids, batch_size=4, progress=False)
    for data, bs in ((ids, 1), (ids, 3), ({"input_ids": ids, "attention_mask": mask}, 2),
                     ([{"input_ids": ids[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}], 8),
                     ([(ids[:1], mask[:1]), ids[1:]], 8), (iter([ids]), 8)):
        torch.testing.assert_close(block_influence(model, data, batch_size=bs, progress=False),
                                   expected, atol=1e-6, rtol=1e-5)


def test_bad_calibration_data_is_a_value_error():
    ids = _windows()
    with pytest.raises(ValueError, match="no non-padding tokens"):
        block_influence(tiny_model("llama"), [{"input_ids": ids, "attention_mask": 0 * ids}],
                        progress=False)
    with pytest.raises(ValueError, match="angular"):
        layer_statistics(tiny_model("llama"), ids, angular=9, progress=False)


def test_out_of_range_token_ids_are_refused_before_the_forward():
    model = tiny_model("llama")
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append("embedding"))
    with pytest.raises(ValueError, match="another model's tokenizer"):
        block_influence(model, torch.full((1, 8), 10_000), progress=False)
    assert calls == []


def test_kernels_are_the_formulas_at_one_token():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 16, generator=generator), torch.randn(3, 5, 16, generator=generator)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    torch.testing.assert_close(block_influence_per_token(a, b).double(), 1 - cos)
    torch.testing.assert_close(angular_distance_per_token(a, b).double(),
                               torch.arccos(cos) / math.pi)
    torch.testing.assert_close(relative_magnitude_per_token(a, b).double(),
                               (b - a).double().norm(dim=-1) / b.double().norm(dim=-1))
    # bf16 inputs are read in fp32 chunks, and a zero state gives a finite cosine
    assert block_influence_per_token(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    assert torch.isfinite(token_cosine(torch.zeros(2, 16), b[0, :2])).all()


def test_pass_stops_before_the_lm_head_and_keeps_the_model_as_it_was():
    model = tiny_model("llama")
    model.train()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    model.model.norm.register_forward_hook(lambda *a: calls.append("norm"))
    block_influence(model, _windows(), progress=False)
    assert calls == []
    assert model.training  # mode restored
    assert all(not layer._forward_hooks for layer in decoder_layers(model))  # hooks removed


def test_peft_and_accelerate_wrapped_models_give_the_same_bi():
    from accelerate import dispatch_model

    peft = pytest.importorskip("peft")
    ids = _windows()
    expected = block_influence(tiny_model("llama"), ids, progress=False)
    wrapped = peft.get_peft_model(tiny_model("llama"),
                                  peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(block_influence(wrapped, ids, progress=False), expected)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)}}
    dispatched = dispatch_model(tiny_model("llama"), device_map=device_map, force_hooks=True)
    torch.testing.assert_close(block_influence(dispatched, ids, progress=False), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bi_on_cuda_in_bf16_matches_cpu():
    model = tiny_model("llama")
    ids = _windows()
    expected = block_influence(model, ids, progress=False)
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    bi = block_influence(gpu, ids, progress=False)
    assert torch.isfinite(bi).all()
    torch.testing.assert_close(bi, expected, atol=2e-2, rtol=0)


def test_norms_of_the_stream_and_relative_updates_match_the_hidden_states():
    from tiny import random_windows, tiny_llama

    model = tiny_llama(layers=4)
    windows = random_windows(n=3, length=10)
    stats = layer_statistics(model, windows, norms=True, progress=False)
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states  # last one after the norm
    norms = torch.stack([h.norm(dim=-1).mean() for h in hs[:-1]])
    torch.testing.assert_close(stats.state_norm[:4], norms, rtol=1e-5, atol=1e-5)
    ratio = torch.stack([((hs[i + 1] - hs[i]).norm(dim=-1) / hs[i].norm(dim=-1)).mean()
                         for i in range(3)])
    torch.testing.assert_close(stats.update_ratio[:3], ratio, rtol=1e-5, atol=1e-5)
    assert stats.state_norm.shape == (5,) and stats.update_ratio.shape == (4,)
    assert layer_statistics(model, windows, progress=False).state_norm is None
