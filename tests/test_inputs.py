"""What goes into a model's forward: batches, their device, positions and token checks."""

import pytest
import torch

from shortgpt_lite.inputs import (
    cache_keyword,
    check_token_ids,
    count_batches,
    iter_batches,
    max_positions,
    model_inputs,
    vocab_rows,
)
from tiny import VOCAB, random_windows, tiny_model


@pytest.mark.parametrize("bad", [torch.randn(2, 8), torch.arange(8), "some text", 3,
                                 [{"attention_mask": torch.ones(1, 4)}]])
def test_bad_data_is_a_value_error(bad):
    with pytest.raises(ValueError, match="input_ids|LongTensor|integer tensor"):
        list(iter_batches(bad))


def test_bad_mask_and_batch_size():
    ids = random_windows()
    with pytest.raises(ValueError, match="attention_mask must be a tensor shaped like"):
        list(iter_batches([{"input_ids": ids, "attention_mask": torch.ones(3, 5)}]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(iter_batches(ids, batch_size=0))


def test_count_batches_matches_what_iter_batches_yields():
    ids = random_windows(n=5)
    mask = torch.ones_like(ids)
    for data in (ids, {"input_ids": ids, "attention_mask": mask}, [ids[:2], ids[2:]]):
        assert count_batches(data, 2) == len(list(iter_batches(data, 2)))
    assert count_batches(iter([ids]), 2) is None  # no length: a bar without a total


def test_left_padding_gets_positions_of_the_real_tokens():
    model = tiny_model("llama")
    ids = random_windows(n=2, length=6)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False
    kwargs = model_inputs(model, ids, mask)
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    assert "position_ids" not in model_inputs(model, ids, torch.ones_like(mask))


def test_model_facts():
    model = tiny_model("llama")
    assert vocab_rows(model) == VOCAB
    assert max_positions(model) == 256
    assert cache_keyword(model) in ("cache", "past_key_values")


def test_token_ids_outside_the_embedding_are_refused():
    model = tiny_model("llama")
    check_token_ids(model, random_windows())  # in range: nothing happens
    for bad in (torch.tensor([[1, VOCAB]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ValueError, match=rf"outside \[0, {VOCAB}\).*another model's tokenizer"):
            check_token_ids(model, bad)


def test_no_public_name_shadows_a_module_of_the_package():
    import importlib
    import pkgutil

    import shortgpt_lite

    for info in pkgutil.iter_modules(shortgpt_lite.__path__):
        module = importlib.import_module(f"shortgpt_lite.{info.name}")
        assert getattr(shortgpt_lite, info.name) is module, info.name
