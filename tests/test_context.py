"""Tests for shortgpt_lite.context: Mini-GPT context pruning, its masks by hand, physical
removal of MLP neurons, vocabulary shrinking, and the errors a user can cause."""

import pytest
import torch
from torch import nn

from shortgpt_lite.context import (
    VocabularyMap,
    context_plan,
    context_prune,
    context_statistics,
    domain_windows,
    neuron_mask,
    normalised_l1,
    random_plan,
    shrink_vocabulary,
)
from tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(layers=3, seed=0, tie=True):
    return tiny_llama(vocab_size=120, layers=layers, max_positions=64, tie=tie, seed=seed,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _windows(n=4, seq_len=16, high=80, seed=1):
    # ids 3..79 only: tokens 80..119 are never used, 0..2 are special
    return torch.randint(3, high, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _every_used_token():
    """Five windows of 16 holding every id from 3 to 79 at least once."""
    return torch.cat([torch.arange(3, 80), torch.arange(3, 6)]).reshape(5, 16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- masks worked by hand


def test_context_mask_by_hand():
    # A linear layer with 4 output neurons that sees two tokens:
    # y(x1 = [1, -2]) = [1, -2, -1, 0.001]; y(x2 = [-3, 4]) = [-3, 4, 1, -0.003]
    # mean |y_j| = [2, 3, 1, 0.002]; normalised by the largest: [2/3, 1, 1/3, 0.002/3]
    linear = nn.Linear(2, 4, bias=False)
    linear.weight.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.001, 0.0]]))
    x = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    with torch.no_grad():
        mean_abs = linear(x).abs().mean(0)
    assert torch.allclose(mean_abs, torch.tensor([2.0, 3.0, 1.0, 0.002]))
    assert torch.allclose(normalised_l1(mean_abs), torch.tensor([2 / 3, 1.0, 1 / 3, 0.002 / 3]))
    assert neuron_mask(mean_abs, threshold=1e-3).tolist() == [False, False, False, True]
    assert neuron_mask(mean_abs, threshold=0.5).tolist() == [False, False, True, True]
    assert neuron_mask(mean_abs, threshold=0.7).tolist() == [True, False, True, True]
    assert neuron_mask(mean_abs, fraction=0.5).tolist() == [False, False, True, True]
    assert neuron_mask(mean_abs, fraction=0.0).tolist() == [False] * 4
    # a threshold above every value still keeps the strongest neuron
    assert neuron_mask(mean_abs, threshold=1.0).tolist() == [True, False, True, True]


def test_statistics_match_a_direct_measurement():
    model = _tiny_llama()
    windows = _windows()
    seen = {}
    mlp = model.model.layers[1].mlp
    handles = [model.model.layers[0].self_attn.q_proj.register_forward_hook(
                   lambda m, a, out: seen.setdefault("q", out.detach().clone())),
               mlp.down_proj.register_forward_pre_hook(
                   lambda m, a: seen.setdefault("h", a[0].detach().clone()))]
    _logits(model, windows)
    for h in handles:
        h.remove()
    stats = context_statistics(model, windows, domain="law", progress=False)
    q = stats.linear["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(q, seen["q"].abs().reshape(-1, 32).mean(0), atol=1e-6)
    assert torch.allclose(stats.activation[1], seen["h"].abs().reshape(-1, 64).mean(0),
                          atol=1e-6)
    assert stats.tokens == windows.numel() and stats.domain == "law"
    assert torch.equal(stats.token_counts, torch.bincount(windows.flatten(), minlength=120))
    assert len(stats.linear) == 3 * 7 and set(stats.activation) == {0, 1, 2}


def test_context_prune_zeroes_exactly_the_planned_rows():
    model = _tiny_llama()
    stats = context_statistics(model, _every_used_token(), progress=False)
    plan = context_plan(stats, threshold=0.5, keep_tokens=[0, 1, 2])
    pruned = context_prune(model, plan, progress=False)
    name = "model.layers.2.mlp.up_proj"
    rows = neuron_mask(stats.linear[name], threshold=0.5)
    assert rows.any()
    weight = dict(pruned.named_modules())[name].weight
    assert torch.equal((weight == 0).all(1), rows | plan.activation[2])
    mlp = pruned.model.layers[1].mlp
    assert torch.equal((mlp.down_proj.weight == 0).all(0), plan.activation[1])
    # tokens 80..119 never occur; the special tokens 0..2 are kept although unused
    expected = torch.zeros(120, dtype=torch.bool)
    expected[80:] = True
    assert torch.equal(plan.tokens, expected)
    # (row 0 is the padding token's, which transformers initialises to zero)
    assert torch.equal((pruned.model.embed_tokens.weight == 0).all(1)[1:], expected[1:])
    assert pruned.config.shortgpt_lite_context["pruned_tokens"] == 40
    assert not (model.model.embed_tokens.weight[1:] == 0).any()  # the input is untouched


# -------------------------------------------------------------------- physical removal


@pytest.mark.parametrize("rule", [{"fraction": 0.25}, {"threshold": 0.4}])
def test_physical_removal_reloads_with_plain_transformers_and_same_logits(rule, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    windows = _windows()
    stats = context_statistics(model, windows, progress=False)
    plan = context_plan(stats, keep_tokens=[0, 1, 2], **rule)
    masked = context_prune(model, plan, progress=False)
    physical = context_prune(model, plan, physical=True, progress=False)
    counts = [int(m.sum()) for m in plan.activation.values()]
    width = 64 - min(counts)
    assert physical.config.intermediate_size == width
    if "fraction" in rule:
        assert counts == [16, 16, 16] and width == 48
    else:
        assert len(set(counts)) > 1  # different widths per layer, padded to the widest
    assert all(layer.mlp.down_proj.in_features == width for layer in physical.model.layers)
    n_masked = sum(p.numel() for p in masked.parameters())
    assert sum(p.numel() for p in physical.parameters()) == n_masked - 3 * 3 * 32 * (64 - width)
    physical.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == width
    test = _windows(n=2, seed=5)
    assert torch.allclose(_logits(reloaded, test), _logits(masked, test), atol=1e-5)


def test_shrunk_vocabulary_reloads_and_maps_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    for tie in (True, False):
        model = _tiny_llama(tie=tie)
        stats = context_statistics(model, _every_used_token(), progress=False)
        plan = context_plan(stats, fraction=0.25, keep_tokens=[0, 1, 2])
        masked = context_prune(model, plan, progress=False)
        small, mapping = shrink_vocabulary(masked, ~plan.tokens)
        assert small.config.vocab_size == 80
        assert (small.config.pad_token_id, small.config.bos_token_id,
                small.config.eos_token_id) == (0, 1, 2)
        folder = tmp_path / f"tie{tie}"
        small.save_pretrained(folder)
        mapping.save(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        mapping = VocabularyMap.load(folder)
        test = _windows(n=2, seed=7)
        expected = _logits(masked, test)[..., mapping.kept]
        assert torch.allclose(_logits(reloaded, mapping.to_new(test)), expected, atol=1e-5)
        assert torch.equal(mapping.to_old(mapping.to_new(test)), test)
        with pytest.raises(ValueError, match="removed"):
            mapping.to_new([5, 100])
        assert mapping.to_new([5, 100], unknown=0).tolist() == [5, 0]


# ---------------------------------------------------------------------------- bad input


def test_random_plan_prunes_the_same_counts_elsewhere_and_is_seeded():
    model = _tiny_llama(layers=2)
    stats = context_statistics(model, _windows(), progress=False)
    like = context_plan(stats, fraction=0.25, min_count=0)
    a, b = random_plan(like, seed=3), random_plan(like, seed=3)
    for field in ("linear", "activation"):
        want, got = getattr(like, field), getattr(a, field)
        assert want.keys() == got.keys()
        for key in want:
            assert int(got[key].sum()) == int(want[key].sum()) > 0
            assert torch.equal(got[key], getattr(b, field)[key])
    assert int(a.tokens.sum()) == int(like.tokens.sum())
    # another seed draws other neurons, and the draw is not the statistic's own choice
    other = random_plan(like, seed=4)
    assert any(not torch.equal(other.activation[k], a.activation[k]) for k in a.activation)
    assert any(not torch.equal(like.activation[k], a.activation[k]) for k in a.activation)
    assert a.rule["random_seed"] == 3 and a.rule["fraction"] == 0.25
    # it prunes like any plan: physically, with the same width left in every block
    pruned = context_prune(model, a, physical=True, progress=False)
    assert pruned.config.intermediate_size == model.config.intermediate_size - int(
        like.activation[0].sum())


def test_bad_input_is_refused():
    model = _tiny_llama(layers=1)
    stats = context_statistics(model, _windows(n=1), progress=False)
    with pytest.raises(ValueError, match="Unknown domain"):
        domain_windows(None, "astrology")
    with pytest.raises(ValueError, match="Unknown domain"):
        context_statistics(model, _windows(n=1), domain="wikipedia", progress=False)
    with pytest.raises(ValueError, match="empty"):
        context_statistics(model, torch.zeros((0, 8), dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        context_statistics(model, "some text", progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        context_plan(stats)
    with pytest.raises(ValueError, match="exactly one"):
        context_plan(stats, threshold=0.1, fraction=0.1)
    with pytest.raises(ValueError, match="fraction"):
        context_plan(stats, fraction=1.0)
    with pytest.raises(ValueError, match="threshold"):
        context_plan(stats, threshold=2.0)
    with pytest.raises(ValueError, match="Nothing to prune"):
        context_plan(stats, fraction=0.1, linear=False, activation=False, embeddings=False)
    plan = context_plan(stats, fraction=0.1, activation=False)
    with pytest.raises(LookupError, match="physical"):
        context_prune(model, plan, physical=True)
    with pytest.raises(ValueError, match="empty"):
        shrink_vocabulary(model, [])


def test_token_ids_outside_the_vocabulary_are_refused_before_the_forward():
    model = _tiny_llama(layers=1)
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="another model's tokenizer"):
        context_statistics(model, torch.full((1, 8), vocab), progress=False)


# ------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_context_pruning_on_smollm2_law(smollm2):
    from shortgpt_lite.evaluate import perplexity

    model, tokenizer = smollm2
    windows = domain_windows(tokenizer, "law", seq_len=128, max_windows=4)
    stats = context_statistics(model, windows, domain="law", progress=False)
    assert len(stats.activation) == 30 and stats.activation[0].numel() == 1536
    plan = context_plan(stats, fraction=0.25, linear=False, embeddings=False)
    masked = context_prune(model, plan, progress=False)
    physical = context_prune(model, plan, physical=True, progress=False)
    assert physical.config.intermediate_size == 1152
    removed = sum(p.numel() for p in model.parameters()) - \
        sum(p.numel() for p in physical.parameters())
    assert removed == 30 * 384 * 3 * 576
    test = windows[:1, :64]
    assert torch.allclose(_logits(physical, test), _logits(masked, test), atol=1e-3)
    del masked
    dense = perplexity(model, windows[:2], progress=False)["perplexity"]
    pruned = perplexity(physical, windows[:2], progress=False)["perplexity"]
    assert dense < pruned < 20 * dense
