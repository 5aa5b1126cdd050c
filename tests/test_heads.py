"""Attention-head removal: the importance statistic, and a pruned model that computes what
the unpruned one computes with those heads silenced, saves, and reloads."""

import copy

import pytest
import torch
import transformers as T

from shortgpt_lite.comparison import prune_to_budget
from shortgpt_lite.costs import param_counts
from shortgpt_lite.heads import head_importance, head_params, heads_for_share, remove_heads
from shortgpt_lite.layers import decoder_layers
from shortgpt_lite.records import pruning_records
from tiny import tiny_llama, tiny_model

WINDOWS = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))


def _silenced(model, removed):
    """A copy of ``model`` whose removed query heads write nothing: their ``o_proj``
    columns zeroed (and, without grouping, nothing else is needed)."""
    silent = copy.deepcopy(model)
    for block, heads in zip(decoder_layers(silent), removed):
        o = block.self_attn.o_proj
        d = block.self_attn.head_dim
        for h in heads:
            o.weight.data[:, h * d:(h + 1) * d] = 0
    return silent


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped (2 query heads per group), and not
def test_removing_heads_equals_silencing_them(kv_heads):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=kv_heads, num_hidden_layers=3, max_position_embeddings=64)).eval()
    importance = head_importance(model, WINDOWS, progress=False)
    assert importance.shape == (3, 4) and (importance > 0).all()
    n = 2 if kv_heads == 2 else 1
    pruned = remove_heads(model, n, importance)
    removed = pruning_records(pruned)["shortgpt_lite_heads"]["query_heads_removed"]
    assert all(len(r) == n for r in removed)
    if kv_heads == 2:  # one from each group of two: heads {0, 1} and {2, 3}
        assert all(sum(h < 2 for h in r) == 1 for r in removed)
    group = 4 // kv_heads
    for scores, r in zip(importance, removed):  # the least important of each group go
        kept = [h for h in range(4) if h not in r]
        for h in r:
            assert all(scores[h] <= scores[k] for k in kept if k // group == h // group)
    with torch.no_grad():
        got = pruned(WINDOWS).logits
        want = _silenced(model, removed)(WINDOWS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lost = param_counts(model)[0] - param_counts(pruned)[0]
    assert lost == n * head_params(model)


def test_the_pruned_model_saves_and_reloads_with_plain_transformers(tmp_path):
    model = tiny_model("llama", layers=2)
    pruned = remove_heads(model, 2, head_importance(model, WINDOWS, progress=False))
    pruned.save_pretrained(tmp_path)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(WINDOWS).logits, pruned(WINDOWS).logits)
    assert again.config.num_attention_heads == 2


def test_gemma3_heads_too():
    model = tiny_model("gemma3", layers=2)
    pruned = remove_heads(model, 2, head_importance(model, WINDOWS, progress=False))
    removed = pruning_records(pruned)["shortgpt_lite_heads"]["query_heads_removed"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(WINDOWS).logits, _silenced(model, removed)(WINDOWS).logits,
                                   rtol=1e-5, atol=1e-5)


def test_head_counts_keep_every_group_a_head():
    model = tiny_model("llama", layers=2)  # 4 query heads, 2 key/value heads
    assert heads_for_share(model, 0.0) == 0
    assert heads_for_share(model, 0.9) == 2  # one of each group's two, never both
    importance = head_importance(model, WINDOWS, progress=False)
    for bad in (1, 3, 4, -2):
        with pytest.raises(ValueError, match="heads_for_share"):
            remove_heads(model, bad, importance)
    with pytest.raises(ValueError, match="one score per block"):
        remove_heads(model, 2, importance[:1])


def test_width_with_heads_meets_the_budget():
    model = tiny_llama(layers=4, intermediate=64)
    total = param_counts(model)[0]
    pruned, info = prune_to_budget(model, "width+heads", 0.3, windows=WINDOWS, progress=False)
    assert info["attention_heads_removed_per_layer"] > 0
    share = 1 - param_counts(pruned)[0] / total
    assert abs(share - 0.3) < 0.02, share


def test_importance_is_the_mean_norm_of_each_heads_write_over_every_token():
    model = tiny_model("llama", layers=1)
    attn = decoder_layers(model)[0].self_attn
    seen = []
    hook = attn.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(WINDOWS)
    hook.remove()
    d = attn.head_dim
    z = seen[0].reshape(-1, 4, d)
    want = torch.stack([(z[:, h] @ attn.o_proj.weight[:, h * d:(h + 1) * d].T).norm(dim=-1).mean()
                        for h in range(4)])
    got = head_importance(model, WINDOWS, batch_size=2, progress=False)[0]  # batches of 2 and 1
    torch.testing.assert_close(got, want.detach())
