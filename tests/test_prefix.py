"""A plan measured from the shared prefix computes what the pruned copy computes."""

import pytest
import torch

import shortgpt_lite as sgl
from shortgpt_lite.evaluate import loglikelihoods
from shortgpt_lite.prefix import SharedPrefix, first_removed, sweep_order
from tiny import ARCHITECTURES, byte_tokenizer, random_windows, tiny_model


def test_first_removed_is_the_smallest_layer_of_each_plan():
    assert first_removed([[], [3, 1], [2], [1, 5]]) == {1, 2}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_replayed_prefix_matches_the_pruned_copy(arch):
    model = tiny_model(arch, layers=5)
    windows = random_windows(n=5, length=10)
    plans = [[2, 3], [1], [0, 4], [3]]
    prefix = SharedPrefix(model, first_removed(plans))
    with prefix.recording():
        full = sgl.perplexity(model, windows, batch_size=2, progress=False)
    assert prefix.nbytes() > 0
    for plan in plans:
        with prefix.removed(plan):
            shared = sgl.perplexity(model, windows, batch_size=2, progress=False)
        copy = sgl.perplexity(sgl.remove_layers(model, plan), windows, batch_size=2,
                              progress=False)
        assert shared["nll"] == pytest.approx(copy["nll"], rel=1e-5, abs=1e-6), plan
        assert shared["nll"] != pytest.approx(full["nll"], rel=1e-6)
    # the blocks are themselves again afterwards
    again = sgl.perplexity(model, windows, batch_size=2, progress=False)
    assert again["nll"] == pytest.approx(full["nll"], rel=1e-6)


def test_replay_works_for_padded_multiple_choice_batches():
    model, tok = tiny_model("llama", layers=4), byte_tokenizer()
    model.resize_token_embeddings(len(tok))
    # two contexts with two continuations each: packed rows with a 4-D mask are replayed too
    requests = [("The cat", " sat"), ("A much longer context here", " on the mat"),
                ("x", " y z"), ("Hello", " world"), ("The cat sat on", " the mat"), ("The cat sat on", " a rug")]
    prefix = SharedPrefix(model, [2])
    with prefix.recording():
        loglikelihoods(model, tok, requests, batch_size=2, progress=False)
    with prefix.removed([2, 3]):
        shared = loglikelihoods(model, tok, requests, batch_size=2, progress=False)
    copy = loglikelihoods(sgl.remove_layers(model, [2, 3]), tok, requests, batch_size=2,
                          progress=False)
    for (a, ga), (b, gb) in zip(shared, copy):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_replaying_other_batches_is_refused():
    model = tiny_model("llama", layers=4)
    prefix = SharedPrefix(model, [2])
    with prefix.recording():
        sgl.perplexity(model, random_windows(n=4, length=10), batch_size=2, progress=False)
    with pytest.raises(RuntimeError, match="batch size"):
        with prefix.removed([2]):
            sgl.perplexity(model, random_windows(n=4, length=10), batch_size=4, progress=False)
    with pytest.raises(RuntimeError, match="Fewer batches"):
        with prefix.removed([2]):
            sgl.perplexity(model, random_windows(n=2, length=10), batch_size=2, progress=False)


def test_a_plan_outside_the_model_is_refused():
    model = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match="0..3"):
        with SharedPrefix(model, []).removed([4]):
            pass


def test_skip_one_perplexity_is_the_same_with_and_without_the_prefix(monkeypatch):
    from shortgpt_lite import importance

    model = tiny_model("llama", layers=5)
    data = random_windows(n=4, length=12)
    shared = sgl.layer_importance(model, data, "ppl", batch_size=2, progress=False)
    full = sgl.layer_importance(model, data, "ppl", batch_size=2, progress=False,
                                share_prefix=False)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(importance, "_PREFIX_BYTES", 0)  # too large to record: full passes
    torch.testing.assert_close(
        sgl.layer_importance(model, data, "ppl", batch_size=2, progress=False), full,
        rtol=1e-5, atol=1e-5)


def test_the_sweep_order_sorts_plans_as_removal_flags_and_starts_where_they_differ():
    order, starts = sweep_order([[5], [2, 3], [3], [2, 3, 7], [], [3, 2]])
    assert order == [[5], [3], [2, 3], [2, 3, 7]]
    # [5] differs from the unpruned model at 5, [3] from [5] at 3, [2, 3] from [3] at 2,
    # [2, 3, 7] from [2, 3] at 7
    assert starts == {5, 3, 2, 7}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_chained_sweep_in_any_order_matches_the_pruned_copies(arch):
    model = tiny_model(arch, layers=6)
    windows = random_windows(n=4, length=10)
    plans = [[3], [3, 4], [1, 3, 4], [1, 3], [0], [0, 1], [2, 5], [1, 5]]
    sweep, starts = sweep_order(plans)
    copies = {tuple(p): sgl.perplexity(sgl.remove_layers(model, p), windows, batch_size=2,
                                       progress=False)["nll"] for p in plans}
    # a plan never starts from a state recorded under another prefix, whatever the order
    for order in (sweep, sweep[::-1], plans):
        prefix = SharedPrefix(model, starts)
        with prefix.recording():
            sgl.perplexity(model, windows, batch_size=2, progress=False)
        for plan in order:
            with prefix.removed(plan, record=True):
                got = sgl.perplexity(model, windows, batch_size=2, progress=False)["nll"]
            assert got == pytest.approx(copies[tuple(plan)], rel=1e-5, abs=1e-6), (order, plan)


def test_chaining_runs_fewer_blocks_than_starting_every_plan_from_the_unpruned_model():
    model = tiny_model("llama", layers=6)
    windows = random_windows(n=4, length=10)
    plans = [[1], [1, 4], [1, 3, 4], [1, 3, 4, 5]]  # nested, as one metric's plans are
    calls = []  # the MLP inside a block runs only where the block really computes
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
               for layer in sgl.decoder_layers(model)]

    def blocks_run(record):
        calls.clear()
        sweep, starts = sweep_order(plans)
        prefix = SharedPrefix(model, starts if record else {min(p) for p in plans})
        with prefix.recording():
            sgl.perplexity(model, windows, batch_size=2, progress=False)
        for plan in sweep:
            with prefix.removed(plan, record=record):
                sgl.perplexity(model, windows, batch_size=2, progress=False)
        return len(calls)

    chained, unchained = blocks_run(True), blocks_run(False)
    for h in handles:
        h.remove()
    # every plan starts at block 1 unchained; chained, [1, 4] starts at 4 and so on
    assert chained < unchained
