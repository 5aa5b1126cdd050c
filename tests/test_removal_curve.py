"""removal_curve: one row per k, the plan of layers_to_remove, shared cache, bootstrap band."""

import math

import pytest
import torch
import transformers as T

from shortgpt_lite import Item, removal_curve, remove_layers
from shortgpt_lite.evaluate import evaluate_choices, perplexity

VOCAB = 64


class _Tok:
    """The least a tokenizer needs for evaluate_choices on plain text: one id per character."""

    bos_token_id = None
    eos_token_id = 1
    pad_token_id = 0
    name_or_path = "chars"

    def __len__(self):
        return VOCAB

    def __call__(self, texts, add_special_tokens=False, return_tensors=None, **_):
        single = isinstance(texts, str)
        ids = [[3 + ord(c) % (VOCAB - 3) for c in t] for t in ([texts] if single else texts)]
        if return_tensors == "pt":
            ids = torch.tensor(ids)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return {"input_ids": ids[0] if single else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _model(layers=5):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128)
    return T.LlamaForCausalLM(config).eval()


def _windows(n=4, length=16):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _items():
    return [Item.simple("piqa", f"Question {i}: which?", ["yes it is", "no"], i % 2)
            for i in range(6)]


def test_one_row_per_k_with_the_lowest_scoring_layers_removed():
    model = _model()
    scores = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0])
    df = removal_curve(model, _Tok(), scores, range(4), windows=_windows(), items=_items(),
                       metric="bi", progress=False)
    assert list(df["k"]) == [0, 1, 2, 3]
    assert list(df["removed"]) == [(), (3,), (1, 3), (1, 3, 4)]
    assert list(df["layers_left"]) == [5, 4, 3, 2]
    assert (df["metric"] == "bi").all()
    for column in ("ppl", "ppl_ci_low", "ppl_ci_high", "seq_len", "acc", "acc_ci_low",
                   "acc_ci_high", "n_items"):
        assert column in df.columns
    assert (df["ppl_ci_low"] <= df["ppl"]).all() and (df["ppl"] <= df["ppl_ci_high"]).all()
    assert (df["acc_ci_low"] <= df["acc"]).all() and (df["acc"] <= df["acc_ci_high"]).all()
    assert (df["seq_len"] == 16).all() and (df["n_items"] == 6).all()
    # k = 0 is the model itself, and the input model is untouched
    assert math.isclose(df["ppl"][0], perplexity(model, _windows(), progress=False)["perplexity"],
                        rel_tol=1e-5)
    assert model.config.num_hidden_layers == 5
    # plans measured from the shared prefix, without a copy, match the pruned copies
    for k, removed in zip(df["k"], df["removed"]):
        pruned = remove_layers(model, removed) if removed else model
        assert math.isclose(df["ppl"][k], perplexity(pruned, _windows(), progress=False)["perplexity"],
                            rel_tol=1e-5)
        assert df["acc"][k] == evaluate_choices(pruned, _Tok(), _items(), progress=False)["acc"]


def test_shared_cache_measures_each_removal_set_once():
    model = _model()
    cache = {}
    a = removal_curve(model, _Tok(), torch.tensor([0.0, 1, 2, 3, 4]), [0, 1, 2], metric="seq",
                      windows=_windows(), cache=cache, progress=False)
    b = removal_curve(model, _Tok(), torch.tensor([0.0, 1, 9, 9, 2]), [0, 1, 2, 3], metric="x",
                      windows=_windows(), cache=cache, progress=False)
    assert list(a["cached"]) == [False, False, False]
    assert list(b["cached"]) == [True, True, True, False]  # {0}, {0, 1} seen before; {0, 1, 4} not
    assert len(cache) == 4
    assert b["ppl"][2] == a["ppl"][2]


def test_generation_column_and_bad_input():
    model = _model()
    df = removal_curve(model, _Tok(), torch.arange(5.0), [0, 2], prompt="abc", max_new_tokens=3,
                       progress=False)
    assert list(df.columns[-2:]) == ["generation", "cached"] and "ppl" not in df.columns
    assert all(isinstance(g, str) for g in df["generation"])
    with pytest.raises(ValueError, match="Nothing to measure"):
        removal_curve(model, _Tok(), torch.arange(5.0), [1], progress=False)
    with pytest.raises(ValueError, match="5 layers"):
        removal_curve(model, _Tok(), torch.arange(4.0), [1], windows=_windows(), progress=False)
