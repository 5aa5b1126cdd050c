"""ShortGPT-gen (shortgpt_lite.generation): the listed layers are identities while a
prompt is read, cache their prompt keys and values from a projection only (unrotated,
as the authors' code does, or rotated on request), and run in full while decoding."""

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from shortgpt_lite.generation import shortgpt_gen
from shortgpt_lite.removal import remove_layers
from tiny import tiny_llama, tiny_model

IDS = torch.randint(128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=6, seed=1)


def test_without_a_cache_it_computes_what_removal_computes(model):
    gen = shortgpt_gen(model, [2, 3])
    with torch.no_grad():
        got = gen(IDS, use_cache=False).logits
        want = remove_layers(model, [2, 3])(IDS, use_cache=False).logits
        dense = model(IDS, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)
    assert all("forward" not in vars(block) for block in model.model.layers)  # a copy


def test_the_prompt_skips_the_layers_and_every_decoding_step_runs_them(model):
    gen = shortgpt_gen(model, [2, 3])
    lengths = []
    gen.model.layers[2].mlp.register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    prompt = IDS[:1]
    with torch.no_grad():
        out = gen.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        first = remove_layers(model, [2, 3])(prompt).logits[0, -1].argmax()
    assert lengths == [1, 1, 1]  # three decoding steps; the first token came from the prefill
    assert out[0, prompt.shape[1]] == first


@pytest.mark.parametrize("rotate", [False, True], ids=["as-the-authors", "rotated"])
def test_a_skipped_layer_caches_the_projection_of_the_state_it_receives(model, rotate):
    gen = shortgpt_gen(model, [2, 3], rotate_prompt_keys=rotate)
    seen = {}

    def record(i):
        def hook(_module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    for i in (2, 3):
        gen.model.layers[i].register_forward_pre_hook(record(i), with_kwargs=True)
    with torch.no_grad():
        cache = gen(IDS, use_cache=True).past_key_values
        torch.testing.assert_close(seen[2][0], seen[3][0], atol=0, rtol=0)  # 2 is an identity
        for i in (2, 3):
            block, (h, (cos, sin)) = gen.model.layers[i], seen[i]
            shape = (*h.shape[:-1], -1, block.self_attn.head_dim)
            x = block.input_layernorm(h)
            keys = block.self_attn.k_proj(x).view(shape).transpose(1, 2)
            values = block.self_attn.v_proj(x).view(shape).transpose(1, 2)
            if rotate:
                _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
            torch.testing.assert_close(cache.layers[i].keys, keys)
            torch.testing.assert_close(cache.layers[i].values, values)
    assert cache.get_seq_length() == IDS.shape[1]


def test_a_deep_copy_runs_its_own_blocks(model):
    gen = shortgpt_gen(model, [1])
    twin = copy.deepcopy(gen)
    assert twin.model.layers[1].forward.__self__ is twin.model.layers[1]
    assert twin.shortgpt_gen_layers == [1]


def test_other_architectures_and_bad_layers_are_refused(model):
    with pytest.raises(ValueError, match="supports llama"):
        shortgpt_gen(tiny_model("gemma3", layers=4), [1])
    with pytest.raises(ValueError, match="out of range"):
        shortgpt_gen(model, [6])
    with pytest.raises(ValueError, match="at least one must stay"):
        shortgpt_gen(model, range(6))


def test_decoded_lambada_matches_the_one_pass_check_and_the_gen_prefill(smollm2):
    """Decoding token by token scores a plain model as the one-pass greedy check does;
    ShortGPT-gen's first predictions are the pruned model's, and only the steps after
    them differ."""
    from shortgpt_lite.data import load_benchmark
    from shortgpt_lite.evaluate import decoded_accuracy, score_items

    model, tokenizer = smollm2
    items = load_benchmark("lambada", 24, seed=0)
    one_pass = score_items(model, tokenizer, items, progress=False)["correct"].to_numpy()
    decoded = decoded_accuracy(model, tokenizer, items, progress=False)
    assert (decoded["correct"] == one_pass).all() and decoded["acc"] > 0
    plan = list(range(20, 28))
    removed = decoded_accuracy(remove_layers(model, plan), tokenizer, items, progress=False)
    gen = decoded_accuracy(shortgpt_gen(model, plan), tokenizer, items, progress=False)
    assert gen["first_token_acc"] == removed["first_token_acc"]
    assert removed["acc"] < decoded["acc"]
    with pytest.raises(ValueError, match="greedy items"):
        decoded_accuracy(model, tokenizer, load_benchmark("piqa", 2), progress=False)
