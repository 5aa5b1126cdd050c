"""Tests for shortgpt_lite.evaluate.

Fast tests use a tiny random Llama with a byte-level tokenizer built in memory; the slow
ones use the bundled SmolLM2-135M (the ``smollm2`` fixture in conftest.py).
"""

import copy
import math

import numpy as np
import pytest
import torch

from shortgpt_lite import evaluate as ev
from shortgpt_lite.data import Item, load_benchmark, token_windows
from tiny import byte_tokenizer, tiny_llama

# ------------------------------------------------------------------------------ fixtures


def _tiny_llama(vocab_size=257, seed=0, max_positions=128):
    model = tiny_llama(vocab_size=vocab_size, layers=2, max_positions=max_positions, seed=seed)
    # A larger spread than the default init, so scores differ clearly between tokens.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == 257
    return _tiny_llama(), tokenizer


def _naive_loglikelihood(model, tokenizer, context, continuation):
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    picked = [logprobs[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
    greedy = all(int(logprobs[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    return float(sum(picked)), greedy


REQUESTS = [
    ("The cat sat on the", " mat"),
    ("A", " b"),
    ("Question: what is longer, a river or a puddle?\nAnswer:", " a river"),
    ("Question: what is longer, a river or a puddle?\nAnswer:", " a puddle of water"),
    ("x", " y"),
    ("x", " z"),
]


# ------------------------------------------------------------------- log-likelihoods


def test_loglikelihoods_equal_a_plain_forward_pass(tiny):
    model, tokenizer = tiny
    # REQUESTS holds two contexts with two continuations each: packed rows are checked too
    assert any(b.attention_mask is not None and b.attention_mask.dim() == 4
               for b in ev.plan_batches(model, tokenizer, REQUESTS, 4))
    got = ev.loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        want_ll, want_greedy = _naive_loglikelihood(model, tokenizer, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy


def test_padding_does_not_change_scores(tiny):
    model, tokenizer = tiny
    one = ev.loglikelihoods(model, tokenizer, REQUESTS, batch_size=1, progress=False)
    # All six in one batch: the short ones get up to 50 pad tokens on the left.
    together = ev.loglikelihoods(model, tokenizer, REQUESTS, batch_size=16, progress=False)
    np.testing.assert_allclose([s for s, _ in one], [s for s, _ in together], atol=1e-4)
    assert [g for _, g in one] == [g for _, g in together]


def test_plan_batches_shares_one_token_answers_and_pads_on_the_left(tiny):
    model, tokenizer = tiny
    requests = [("Is it?", "A"), ("Is it?", "B"), ("A much longer question here?", "AB")]
    for share in (True, False):
        batches = ev.plan_batches(model, tokenizer, requests, batch_size=8, share_context=share)
        assert len(batches) == 1
        ids, mask, positions, keep, rows, tokens = batches[0]
        # a row is the context plus all but the last continuation token, so the two
        # one-token answers after the same context share one row in either layout
        assert ids.shape[0] == len(rows) == 2
        assert sorted(i for _, members in rows for i, _, _ in members) == [0, 1, 2]
        assert mask is not None and mask.dim() == 2
        assert mask[0].all() and not mask[1].all()  # longest row first
        assert positions[1, -1] == mask[1].sum() - 1
        assert keep == 2 and [n for n, _ in rows] == [2, 1]
        assert tokens == int(mask.sum())


def test_choices_of_one_context_are_packed_into_one_row(tiny):
    model, tokenizer = tiny
    context = "Question: is it big?"
    requests = [(context, " yes indeed"), (context, " no"), (context, " maybe so")]
    (ids, mask, positions, keep, rows, tokens), = ev.plan_batches(model, tokenizer, requests, 8)
    n_ctx = len(context)  # one token per byte
    segments = [len(c) - 1 for _, c in requests]  # each continuation but its last token
    assert ids.shape == (1, n_ctx + sum(segments)) and tokens == ids.numel()
    # positions restart where the context ends for every continuation
    assert positions[0].tolist() == list(range(n_ctx)) + [n_ctx + j for s in segments
                                                           for j in range(s)]
    visible = mask[0, 0] == 0
    start = n_ctx + segments[0]  # the first token of " no"'s segment
    assert visible[start, :n_ctx].all()  # sees the whole context
    assert not visible[start, n_ctx:start].any()  # and not the continuation before it
    assert visible[start, start] and visible[start + 1, start] and not visible[start, start + 1]
    assert keep == rows[0][0] == 1 + sum(segments)
    assert [offset for _, _, offset in rows[0][1]] == [0, segments[0], segments[0] + segments[1]]
    # one row per request without sharing, each its own context + continuation
    unshared = ev.plan_batches(model, tokenizer, requests, 8, share_context=False)
    assert sum(len(b.rows) for b in unshared) == 3
    assert sum(b.tokens for b in unshared) == sum(n_ctx + len(c) - 1 for _, c in requests)


# Two choices after one long context (packed), two after a short one (kept apart), one alone.
ARCH_REQUESTS = [("Question: which is longer?\nAnswer:", " a river"),
                 ("Question: which is longer?\nAnswer:", " a puddle of water"),
                 ("Hi", " there you"), ("Hi", " x"), ("A context of its own", " at all")]


def _every_architecture(tokenizer):
    """``(name, model)`` for a 2-layer random model of every architecture in tiny.py."""
    import transformers as T

    from tiny import ARCHITECTURES, tiny_config

    for name in ARCHITECTURES:
        config = tiny_config(name, 2)
        if getattr(config, "sliding_window", None):
            config.sliding_window = 64  # wider than every request, so rows may be packed
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config).eval()
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        yield name, model


def test_packed_rows_score_as_one_row_per_request_on_every_architecture():
    tokenizer, requests = byte_tokenizer(), ARCH_REQUESTS
    for name, model in _every_architecture(tokenizer):
        packed = ev.loglikelihoods(model, tokenizer, requests, 4, progress=False)
        alone = ev.loglikelihoods(model, tokenizer, requests, 1, progress=False,
                                  share_context=False)
        np.testing.assert_allclose([s for s, _ in packed], [s for s, _ in alone], atol=1e-4,
                                   err_msg=name)
        assert [g for _, g in packed] == [g for _, g in alone], name
        masks = [b.attention_mask for b in ev.plan_batches(model, tokenizer, requests, 4)]
        assert any(m is not None and m.dim() == 4 for m in masks) == (name != "falcon_alibi"), \
            name


def test_the_head_runs_on_the_scored_positions_alone_on_every_architecture():
    """The output head sees only each row's scored positions, and the scores equal those
    from the full ``[batch, keep, vocab]`` logits (Gemma 2's soft-capping included)."""
    tokenizer, requests = byte_tokenizer(), ARCH_REQUESTS
    for name, model in _every_architecture(tokenizer):
        batches = ev.plan_batches(model, tokenizer, requests, 4)
        seen: list = []
        hook = model.get_output_embeddings().register_forward_hook(
            lambda m, args, out, seen=seen: seen.append(tuple(out.shape[:2])))
        gathered = ev.loglikelihoods(model, tokenizer, requests, 4, progress=False)
        hook.remove()
        assert seen == [(1, sum(n for n, _ in b.rows)) for b in batches], name
        assert any(len(b.rows) > 1 and len({n for n, _ in b.rows}) > 1 for b in batches)
        full = ev.loglikelihoods(model, tokenizer, requests, 4, progress=False,
                                 head_at_scored=False)
        np.testing.assert_allclose([s for s, _ in gathered], [s for s, _ in full], atol=1e-5,
                                   err_msg=name)
        assert [g for _, g in gathered] == [g for _, g in full], name


def test_a_context_shorter_than_a_continuation_is_not_packed(tiny):
    model, tokenizer = tiny
    requests = [("Goal:", " pour the water slowly"), ("Goal:", " pour it")]
    assert sum(len(b.rows) for b in ev.plan_batches(model, tokenizer, requests, 8)) == 2
    context = "Goal: make tea in a pot"
    requests = [(context, " pour the water"), (context, " pour it")]
    assert sum(len(b.rows) for b in ev.plan_batches(model, tokenizer, requests, 8)) == 1


def test_a_sliding_window_shorter_than_the_request_keeps_rows_apart(tiny):
    model, tokenizer = tiny
    requests = [("Question: which is longer?", " a river"), ("Question: which is longer?", " a lake")]
    model = copy.deepcopy(model)
    model.config.sliding_window = 16
    assert sum(len(b.rows) for b in ev.plan_batches(model, tokenizer, requests, 8)) == 2
    model.config.sliding_window = 64
    assert sum(len(b.rows) for b in ev.plan_batches(model, tokenizer, requests, 8)) == 1


def test_trailing_space_of_the_context_moves_to_the_continuation(tiny):
    model, tokenizer = tiny
    (a, _), (b, _) = ev.loglikelihoods(model, tokenizer, [("The cat sat on the ", "mat"),
                                                          ("The cat sat on the", " mat")],
                                       progress=False)
    assert a == pytest.approx(b, abs=1e-5)


def test_greedy_item_counts_right_only_when_the_target_is_the_argmax(tiny):
    model, tokenizer = tiny
    # The random model's greedy bytes need not be valid UTF-8: take the first context
    # whose greedy two-token continuation survives decoding and re-encoding.
    for context in ("Once upon a", "Hello", "abc", "The end", "xyz", "Q:", "1 2 3", "ok"):
        ids = tokenizer(context, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=256)
        target = tokenizer.decode(out[0, ids.shape[1]:])
        if tokenizer(context + target)["input_ids"] == out[0].tolist():
            break
    else:
        pytest.skip("no context with a decodable greedy continuation")
    wrong = target[::-1] if target[::-1] != target else target + "!"
    items = [Item("lambada", context, (target,), 0, ((context, target),), greedy=True),
             Item("lambada", context, (wrong,), 0, ((context, wrong),), greedy=True)]
    per_item = ev.score_items(model, tokenizer, items, progress=False)
    assert per_item["correct"].tolist() == [1.0, 0.0]
    result = ev.evaluate_choices(model, tokenizer, items, progress=False)
    assert result["acc"] == 0.5 and math.isnan(result["acc_norm"])
    assert result["perplexity"] > 1


# ------------------------------------------------------------------ acc and acc_norm


def test_acc_norm_by_hand(monkeypatch, tiny):
    model, tokenizer = tiny
    items = [
        # acc picks the short choice (-4 > -6); per character -4/2 = -2 < -6/6 = -1.
        Item.simple("piqa", "q1", ["ab", "abcdef"], label=1),
        Item.simple("piqa", "q2", ["abc", "a", "abcdefghi"], label=0),
        Item.simple("boolq", "q3", ["no", "yes"], label=1),
    ]
    fixed = [-4.0, -6.0,  # q1: acc -> 0 (wrong), acc_norm -> 1 (right)
             -3.0, -2.0, -9.0,  # q2: acc -> 1 (wrong); per char -1, -2, -1 -> tie, first: 0
             -1.0, -0.5]  # q3: acc -> 1 (right); BoolQ reports no acc_norm
    monkeypatch.setattr(ev, "_loglikelihoods",
                        lambda *a, **k: ([(s, False) for s in fixed], 42))
    per_item = ev.score_items(model, tokenizer, items, progress=False)
    assert per_item["pred"].tolist() == [0, 1, 1]
    assert per_item["pred_norm"].tolist() == [1, 0, 1]
    assert per_item["correct"].tolist() == [0.0, 0.0, 1.0]
    assert per_item["correct_norm"].tolist()[:2] == [1.0, 1.0]
    assert math.isnan(per_item["correct_norm"].iloc[2])

    result = ev.evaluate_choices(model, tokenizer, items, progress=False)
    assert result["acc"] == pytest.approx(1 / 3)
    assert result["acc_norm"] == 1.0  # over the two items whose task reports it
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert result["tokens"] == 42
    # lm-evaluation-harness's stderr: sample std (ddof=1) / sqrt(n)
    assert result["acc_stderr"] == pytest.approx(np.std([0, 0, 1], ddof=1) / math.sqrt(3))
    assert result["acc_ci_low"] < result["acc"] < result["acc_ci_high"]


def test_wilson_interval_known_values():
    low, high = ev.binomial_ci(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = ev.binomial_ci(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    # With 200 items at 50%, the interval is wider than a 3-point difference.
    low, high = ev.binomial_ci(100, 200)
    assert high - low > 0.13


# --------------------------------------------------------------------------- perplexity


def test_uniform_model_has_perplexity_equal_to_its_vocabulary(tiny):
    model = _tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token
    windows = torch.randint(0, 257, (5, 16), generator=torch.Generator().manual_seed(0))
    result = ev.perplexity(model, windows, batch_size=2, progress=False)
    assert result["perplexity"] == pytest.approx(257, rel=1e-5)
    assert result["seq_len"] == 16 and result["windows"] == 5 and result["tokens"] == 5 * 15


def test_perplexity_is_exp_of_mean_cross_entropy_whatever_the_batch(tiny):
    model, _ = tiny
    windows = torch.randint(0, 257, (5, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(windows).logits
    want = math.exp(float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 257), windows[:, 1:].reshape(-1))))
    for batch_size in (1, 2, 5):
        got = ev.perplexity(model, windows, batch_size=batch_size, progress=False)["perplexity"]
        assert got == pytest.approx(want, rel=1e-5)


def test_per_window_nll_averages_to_the_perplexity(tiny):
    model, _ = tiny
    windows = torch.randint(0, 257, (5, 16), generator=torch.Generator().manual_seed(2))
    result = ev.perplexity(model, windows, batch_size=2, progress=False, per_window=True)
    with torch.no_grad():
        logits = model(windows).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:],
                                             reduction="none").mean(dim=1)
    np.testing.assert_allclose(result["nll_per_window"], want.double().numpy(), rtol=1e-5)
    assert result["nll"] == pytest.approx(result["nll_per_window"].mean(), rel=1e-12)
    assert result["batch_size"] == 2
    assert "nll_per_window" not in ev.perplexity(model, windows, progress=False)


def test_bootstrap_interval_resamples_the_mean():
    values = np.random.default_rng(3).normal(2.0, 1.0, size=40)
    low, high = ev.bootstrap_interval(values, n_boot=4000, seed=1)
    draws = np.random.default_rng(1).integers(0, 40, size=(4000, 40))
    want = np.percentile(values[draws].mean(axis=1), [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(want))
    # about mean ± 1.96 standard errors, and narrower at a lower level
    se = values.std(ddof=1) / np.sqrt(40)
    assert low == pytest.approx(values.mean() - 1.96 * se, abs=0.1)
    narrow = ev.bootstrap_interval(values, n_boot=4000, seed=1, level=0.5)
    assert low < narrow[0] < narrow[1] < high
    # the same draws for two arrays of one length: the interval of a difference is paired
    shifted = ev.bootstrap_interval(values + 1.0, n_boot=4000, seed=1)
    assert shifted == pytest.approx((low + 1.0, high + 1.0))
    assert all(math.isnan(x) for x in ev.bootstrap_interval([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        ev.bootstrap_interval(np.ones((2, 3)))


# --------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error(tiny):
    model, tokenizer = tiny
    good = Item.simple("piqa", "q", ["a", "b"], label=0)
    with pytest.raises(ValueError, match="empty"):
        ev.evaluate_choices(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="label 2"):
        ev.evaluate_choices(model, tokenizer, [good, Item.simple("piqa", "q", ["a", "b"], 2)],
                            progress=False)
    with pytest.raises(ValueError, match="label -1"):
        ev.score_items(model, tokenizer, [Item.simple("piqa", "q", ["a", "b"], -1)],
                       progress=False)
    # 128 positions: a window of 129 tokens does not fit.
    with pytest.raises(ValueError, match="only 128 positions"):
        ev.perplexity(model, torch.zeros((2, 129), dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="another model's tokenizer"):
        ev.perplexity(model, torch.full((1, 8), 300, dtype=torch.long), progress=False)
    # A model whose vocabulary is far bigger, and one far smaller, than the tokenizer's.
    for vocab in (1000, 100):
        with pytest.raises(ValueError, match="belong to different models"):
            ev.evaluate_choices(_tiny_llama(vocab_size=vocab), tokenizer, [good], progress=False)
    with pytest.raises(ValueError, match="belong to different models"):
        ev.generation_samples(_tiny_llama(vocab_size=1000), tokenizer, ["hi"], progress=False)


# --------------------------------------------------------------------------- generation


def test_generation_samples_are_greedy_and_repeatable(tiny):
    model, tokenizer = tiny
    first = ev.generation_samples(model, tokenizer, ["Hello", "2 + 2 ="], max_new_tokens=5,
                                  progress=False)
    again = ev.generation_samples(model, tokenizer, ["Hello", "2 + 2 ="], max_new_tokens=5,
                                  progress=False)
    assert list(first.columns) == ["prompt", "continuation", "new_tokens"]
    assert first.equals(again)
    assert (first["new_tokens"] <= 5).all()


# ----------------------------------------------------------- the bundled model (slow)

# Pairs in which the same two answers swap roles, so a model that ignores the context
# gets exactly one of each pair right: 50%.
EASY_PAIRS = [
    ("The capital of France is", " Paris", "The capital of Italy is", " Rome"),
    ("Monday, Tuesday,", " Wednesday", "January, February,", " March"),
    ("The cat says", " meow", "The cow says", " moo"),
    ("One, two, three, four,", " five", "Eight, nine, ten, eleven,", " twelve"),
    ("The opposite of hot is", " cold", "The opposite of short is", " tall"),
    ("A, B, C, D,", " E", "V, W, X, Y,", " Z"),
    ("Roses are red, violets are", " blue", "Grass is usually", " green"),
    ("She drank a glass of cold", " water", "He ate a slice of", " bread"),
]


def _easy_items():
    items = []
    for ctx_a, ans_a, ctx_b, ans_b in EASY_PAIRS:
        items.append(Item.simple("easy", ctx_a, [ans_a.strip(), ans_b.strip()], label=0))
        items.append(Item.simple("easy", ctx_b, [ans_a.strip(), ans_b.strip()], label=1))
    return items


def _scrambled(model, seed=0):
    """The model with each weight tensor's entries randomly permuted: same shapes and
    statistics, no knowledge."""
    scrambled = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in scrambled.parameters():
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=gen)])
    return scrambled


@pytest.mark.slow
def test_real_model_picks_easy_answers_and_a_scrambled_copy_does_not(smollm2):
    model, tokenizer = smollm2
    items = _easy_items()
    real = ev.evaluate_choices(model, tokenizer, items, progress=False)
    assert real["acc"] >= 15 / 16
    scrambled = ev.evaluate_choices(_scrambled(model), tokenizer, items, progress=False)
    assert scrambled["acc"] <= 11 / 16


@pytest.mark.slow
def test_continuation_tokens_follow_lm_eval(smollm2):
    _, tokenizer = smollm2
    (ctx, cont), = ev._encode_requests(tokenizer, [("The capital of France is ", "Paris")])
    assert ctx == tokenizer("The capital of France is")["input_ids"]
    assert cont == tokenizer(" Paris")["input_ids"]  # the space moved over


@pytest.mark.slow
def test_dense_model_beats_chance_on_200_piqa_items(smollm2):
    model, tokenizer = smollm2
    result = ev.evaluate_choices(model, tokenizer, load_benchmark("piqa", 200, seed=0),
                                 progress=False)
    assert result["n"] == 200 and result["chance"] == 0.5
    assert result["acc_ci_low"] > 0.5
    assert result["acc_norm_ci_low"] > 0.5


@pytest.mark.slow
def test_wikipedia_perplexity_at_512_tokens_is_in_band(smollm2):
    model, tokenizer = smollm2
    result = ev.text_perplexity(model, tokenizer, "wikipedia", "evaluation", seq_len=512,
                                max_windows=4, progress=False)
    # SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised): about 24 on these windows.
    assert result["seq_len"] == 512 and result["windows"] == 4
    assert 15 < result["perplexity"] < 35
    windows = token_windows(tokenizer, "The cat sat on the mat. " * 200, seq_len=128,
                            max_windows=1)
    assert ev.perplexity(model, windows, progress=False)["perplexity"] < 3  # a repeated line
