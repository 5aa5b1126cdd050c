"""Tests for shortgpt_lite.wanda: the Wanda and magnitude masks, N:M structure, the
block-by-block calibration, reloading, and the errors a user can cause."""

import copy

import pytest
import torch
from torch import nn

from shortgpt_lite.wanda import (
    magnitude_prune,
    prunable_parameters,
    sparsity_mask,
    sparsity_report,
    wanda_prune,
    wanda_scores,
)
from tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(hidden=128, intermediate=256, layers=3, seed=0):
    return tiny_llama(vocab_size=200, hidden=hidden, intermediate=intermediate, layers=layers,
                      max_positions=128, seed=seed)


def _windows(n=6, seq_len=16, seed=1):
    return torch.randint(0, 200, (n, seq_len), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- masks worked by hand


def test_wanda_mask_by_hand():
    # A 2x4 linear layer that sees two tokens. Column norms ||X_j||_2:
    # col 0: sqrt(3^2 + 4^2) = 5, col 1: 1, col 2: 1, col 3: 0.25.
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                           [4.0, 3.0, -2.0, 1.0]])
    x = torch.tensor([[3.0, 0.0, 1.0, 0.0],
                      [4.0, 1.0, 0.0, 0.25]])
    linear = nn.Linear(4, 2, bias=False)
    linear.weight.data.copy_(weight)
    seen = []
    linear.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    linear(x)
    norms = seen[0].pow(2).sum(0).sqrt()
    assert torch.allclose(norms, torch.tensor([5.0, 1.0, 1.0, 0.25]))
    # S = |W| * norms: row 0 = [5, 2, 3, 1], row 1 = [20, 3, 2, 0.25]
    scores = wanda_scores(weight, norms)
    assert torch.allclose(scores, torch.tensor([[5.0, 2.0, 3.0, 1.0], [20.0, 3.0, 2.0, 0.25]]))
    # 50% per row: row 0 loses inputs 3 and 1, row 1 loses inputs 3 and 2
    expected = torch.tensor([[False, True, False, True], [False, False, True, True]])
    assert torch.equal(sparsity_mask(scores, 0.5), expected)
    # Magnitude alone would prune row 0's inputs 0 and 1: the activations change the mask
    magnitude = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert torch.equal(sparsity_mask(weight.abs(), 0.5), magnitude)
    # Per layer, the 4 lowest of all 8 scores: 0.25, 1, 2 (row 0), 2 (row 1); ties to the
    # lower flat index
    layer = torch.tensor([[False, True, False, True], [False, False, True, True]])
    assert torch.equal(sparsity_mask(scores, 0.5, per="layer"), layer)
    # 2:4 on the same scores equals the per-row 50% mask; 1:2 works group by group:
    # row 0 groups [5, 2] [3, 1] -> prune 1 and 3; row 1 [20, 3] [2, 0.25] -> prune 1 and 3
    assert torch.equal(sparsity_mask(scores, "2:4"), expected)
    one_two = torch.tensor([[False, True, False, True], [False, True, False, True]])
    assert torch.equal(sparsity_mask(scores, "1:2"), one_two)
    # N:M keeps N of every M (NVIDIA's and the paper's convention): 1:4 zeroes the 3 lowest,
    # 3:4 the lowest one. Row 0 is [5, 2, 3, 1], row 1 [20, 3, 2, 0.25].
    assert torch.equal(sparsity_mask(scores, "1:4"), torch.tensor([[False, True, True, True],
                                                                   [False, True, True, True]]))
    assert torch.equal(sparsity_mask(scores, "3:4"), torch.tensor([[False, False, False, True],
                                                                   [False, False, False, True]]))


def test_wanda_prune_applies_the_hand_mask_to_a_linear_in_a_model():
    model = _tiny_llama(layers=1)
    windows = _windows()
    linear = model.model.layers[0].mlp.gate_proj
    seen = []
    handle = linear.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    norms = x.pow(2).sum(0).sqrt()
    expected = sparsity_mask(linear.weight.abs() * norms, 0.5)
    pruned = wanda_prune(model, windows, 0.5, batch_size=4, progress=False)
    got = pruned.model.layers[0].mlp.gate_proj.weight == 0
    assert torch.equal(got, expected)
    # per="layer" ranks the same scores over the whole matrix: a different mask, with the
    # same count of zeros but not the same count in every row
    whole = sparsity_mask(linear.weight.abs() * norms, 0.5, per="layer")
    assert not torch.equal(whole, expected) and int(whole.sum()) == int(expected.sum())
    assert whole.sum(1).unique().numel() > 1
    per_layer = wanda_prune(model, windows, 0.5, per="layer", batch_size=4, progress=False)
    assert torch.equal(per_layer.model.layers[0].mlp.gate_proj.weight == 0, whole)
    assert per_layer.config.shortgpt_lite_sparsity["per"] == "layer"


def _sum_squares(sums, name):
    def collect(module, args):
        sums[name] += args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)
    return collect


def _reference_wanda(model, windows, sparsity):
    """Block by block with a full forward pass for each block: slow but plainly right."""
    model = copy.deepcopy(model)
    for block in model.model.layers:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        handles = [m.register_forward_pre_hook(_sum_squares(sums, n)) for n, m in linears.items()]
        with torch.no_grad():
            model(windows)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                m.weight[sparsity_mask(m.weight.abs() * sums[n].sqrt(), sparsity)] = 0
    return model


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_block_by_block_calibration_feeds_pruned_outputs_forward(sparsity):
    model = _tiny_llama()
    windows = _windows()
    ours = wanda_prune(model, windows, sparsity, batch_size=4, progress=False)
    reference = _reference_wanda(model, windows, sparsity)
    for a, b in zip(ours.model.layers, reference.model.layers):
        for (name, m1), m2 in zip(a.named_modules(), b.modules()):
            if isinstance(m1, nn.Linear):
                assert torch.equal(m1.weight == 0, m2.weight == 0), name
    # the input model is untouched
    assert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == 0


# ------------------------------------------------------------------ structure and budget


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_structure_holds_in_every_group(pattern):
    n, m = map(int, pattern.split(":"))
    pruned = wanda_prune(_tiny_llama(), _windows(), pattern, progress=False)
    for block in pruned.model.layers:
        for linear in (mod for mod in block.modules() if isinstance(mod, nn.Linear)):
            zeros = (linear.weight == 0).reshape(linear.out_features, -1, m).sum(-1)
            assert bool((zeros == n).all())
    report = sparsity_report(pruned)
    assert report["sparsity"].eq(n / m).all()
    assert pruned.config.shortgpt_lite_sparsity["structure"] == pattern


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9])
def test_sparsity_is_reached_within_half_a_percent(sparsity):
    model = _tiny_llama()
    windows = _windows()
    for pruned in (wanda_prune(model, windows, sparsity, progress=False),
                   magnitude_prune(model, sparsity, progress=False),
                   magnitude_prune(model, sparsity, per="layer", progress=False)):
        report = sparsity_report(pruned)
        assert abs(report["zeros"].sum() / report["params"].sum() - sparsity) < 0.005
        assert (report["sparsity"] - sparsity).abs().max() < 0.005
        assert report["params"].sum() == prunable_parameters(model)


def test_long_windows_are_cut_to_max_seq_len():
    model = _tiny_llama(layers=1)
    long = _windows(n=2, seq_len=40)
    pruned = wanda_prune(model, long, 0.5, max_seq_len=16, progress=False)
    record = pruned.config.shortgpt_lite_sparsity
    assert record["calibration_seq_len"] == 16 and record["calibration_tokens"] == 2 * 2 * 16


def test_pruned_model_saves_and_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    windows = _windows()
    pruned = wanda_prune(_tiny_llama(), windows, 0.5, progress=False)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(pruned(windows).logits, reloaded(windows).logits)
    assert sparsity_report(reloaded).equals(sparsity_report(pruned))
    assert reloaded.config.shortgpt_lite_sparsity["method"] == "wanda"


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "4:4", "5:4", "0:4",
                                 "a:b", "50%", None])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity|N:M|N < M"):
        wanda_prune(_tiny_llama(layers=1), _windows(), bad, progress=False)
    with pytest.raises(ValueError):
        magnitude_prune(_tiny_llama(layers=1), bad, progress=False)


def test_bad_calibration_data_is_refused():
    model = _tiny_llama(layers=1)
    with pytest.raises(ValueError, match="empty"):
        wanda_prune(model, torch.zeros((0, 16), dtype=torch.long), 0.5, progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        wanda_prune(model, torch.rand(2, 16), 0.5, progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        wanda_prune(model, [[1, 2, 3]], 0.5, progress=False)


def test_an_error_midway_leaves_the_model_in_its_training_mode(monkeypatch):
    import shortgpt_lite.wanda as wanda

    model = _tiny_llama(layers=2).train()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(wanda, "sparsity_mask", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        wanda_prune(model, _windows(), 0.5, inplace=True, progress=False)
    assert model.training


def test_block_inputs_replay_every_block():
    from shortgpt_lite.layers import decoder_layers
    from shortgpt_lite.wanda import block_inputs, run_block

    model = _tiny_llama(layers=2)
    windows = _windows(n=4)
    states = []
    for block in decoder_layers(model):
        block.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(
            out, tuple) else out))
    with torch.no_grad():
        model(windows)
    hidden, calls, tuple_output = block_inputs(model, windows, batch_size=2)
    assert len(hidden) == 2 and not any("forward" in b.__dict__ for b in decoder_layers(model))
    with torch.no_grad():
        for b, block in enumerate(decoder_layers(model)):
            states.clear()
            hidden = run_block(block, hidden, calls[b], tuple_output)
    with torch.no_grad():
        states.clear()
        model(windows)
    torch.testing.assert_close(torch.cat(hidden), states[-1])


def test_other_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of M"):
        sparsity_mask(torch.rand(4, 6), "2:4")
    with pytest.raises(ValueError, match="per must be"):
        sparsity_mask(torch.rand(4, 8), 0.5, per="column")
    with pytest.raises(ValueError, match="per must be"):
        magnitude_prune(_tiny_llama(layers=1), 0.5, per="model", progress=False)
    with pytest.raises(ValueError, match="per must be"):
        wanda_prune(_tiny_llama(layers=1), _windows(), 0.5, per="column", progress=False)
    with pytest.raises(ValueError, match="one entry per input"):
        wanda_scores(torch.rand(4, 8), torch.rand(7))


# ------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_wanda_beats_magnitude_on_smollm2(smollm2):
    from shortgpt_lite.data import load_text, token_windows
    from shortgpt_lite.evaluate import perplexity

    model, tokenizer = smollm2
    calibration = token_windows(tokenizer, load_text("wikipedia", "calibration"), 128, 4)
    evaluation = token_windows(tokenizer, load_text("wikipedia", "evaluation"), 128, 4)
    zeros_before = int((model.model.layers[0].mlp.up_proj.weight == 0).sum())
    dense = perplexity(model, evaluation, progress=False)["perplexity"]
    wanda = wanda_prune(model, calibration, 0.5, progress=False)
    report = sparsity_report(wanda)
    assert len(report) == 30 * 7 and abs(report["sparsity"].mean() - 0.5) < 0.005
    ppl_wanda = perplexity(wanda, evaluation, progress=False)["perplexity"]
    del wanda
    magnitude = magnitude_prune(model, 0.5, progress=False)
    ppl_magnitude = perplexity(magnitude, evaluation, progress=False)["perplexity"]
    assert dense < ppl_wanda < ppl_magnitude
    # the fixture's model is untouched
    assert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == zeros_before
