"""Healing after layer removal (shortgpt_lite.healing): each recipe lowers its own loss on
held-out windows, the result is a plain model that reloads with equal logits and
documents how it was healed, a fixed seed gives the same weights, and bad input is
refused with a message."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortgpt_lite.healing import METHODS, bridge_segments, distillation_loss, heal, lm_loss
from shortgpt_lite.records import HEALING_RECORD, REMOVAL_RECORD
from shortgpt_lite.removal import remove_layers
from shortgpt_lite.wanda import wanda_prune
from tiny import tiny_llama, tiny_model


def pattern(n, seq_len=32, vocab=128, seed=0):
    """Arithmetic sequences mod the vocabulary: learnable, so healing has work to do."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(seq_len)) % vocab


@pytest.fixture(scope="module")
def teacher():
    """A tied-embedding tiny Llama trained on the pattern until it predicts it well."""
    model = tiny_llama(layers=6, tie=True, seed=0).train()
    data = pattern(256, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = lm_loss(model, data[torch.randint(len(data), (16,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert loss < 1.0  # it learnt the pattern
    return model


TRAIN, HELD = pattern(64, seed=1), pattern(16, seed=2)


def kl_to(teacher, model, ids):
    with torch.no_grad():
        return float(distillation_loss(model(ids).logits, teacher(ids).logits))


def held_lm(model):
    with torch.no_grad():
        return float(lm_loss(model, HELD))


@pytest.mark.parametrize("plan", [[2, 3], [0, 2, 5]], ids=["run", "scattered"])
@pytest.mark.parametrize("method", METHODS)
def test_each_recipe_lowers_its_held_out_loss(teacher, method, plan):
    pruned = remove_layers(teacher, plan)
    healed = heal(pruned, TRAIN, teacher=teacher, method=method, steps=40, lr=3e-3,
                  progress=False)
    if method == "lora":  # the language-modelling loss it trains on
        assert held_lm(healed) < 0.7 * held_lm(pruned)
    else:  # distance to the teacher, which distillation and bridging train on
        assert kl_to(teacher, healed, HELD) < 0.5 * kl_to(teacher, pruned, HELD)
    assert type(healed) is type(pruned)
    assert not any("lora" in name for name, _ in healed.named_parameters())
    assert healed.config.num_hidden_layers == 6 - len(plan)


def block_zeros(model):
    return {n: p == 0 for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}


@pytest.mark.parametrize("method", ["lora", "distill"])
def test_a_sparse_model_keeps_its_zeros_and_still_heals(teacher, method):
    sparse = wanda_prune(teacher, TRAIN[:8], 0.7, progress=False)
    zeros = block_zeros(sparse)
    assert sum(int(z.sum()) for z in zeros.values()) > 0.6 * sum(z.numel() for z in zeros.values())
    seen = []
    healed = heal(sparse, TRAIN, teacher=teacher, method=method, steps=40, lr=3e-3, every=20,
                  on_checkpoint=lambda m, *_: seen.append(block_zeros(m)), progress=False)
    for got in seen + [block_zeros(healed)]:
        assert all(torch.equal(got[n] | z, got[n]) for n, z in zeros.items())
    assert healed.config.shortgpt_lite_healing["zeros_kept"]
    if method == "lora":
        assert held_lm(healed) < 0.9 * held_lm(sparse)
    else:
        assert kl_to(teacher, healed, HELD) < 0.7 * kl_to(teacher, sparse, HELD)
    # without the record the zeros move: the masking is what kept them
    del sparse.config.shortgpt_lite_sparsity
    unmasked = block_zeros(heal(sparse, TRAIN, teacher=teacher, method=method, steps=2,
                                lr=3e-3, progress=False))
    assert not all(torch.equal(unmasked[n] | z, unmasked[n]) for n, z in zeros.items())


def test_healed_model_reloads_with_equal_logits_and_keeps_both_records(teacher, tmp_path):
    pruned = remove_layers(teacher, [2, 3], metric="bi")
    healed = heal(pruned, TRAIN, teacher=teacher, method="distill+lora", steps=3,
                  teacher_name="tiny-teacher", progress=False)
    healed.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(HELD).logits, healed(HELD).logits)
    record = getattr(again.config, HEALING_RECORD)
    assert record["method"] == "distill+lora" and record["steps"] == 3
    assert record["tokens"] == 3 * 4 * 32 and record["teacher"] == "tiny-teacher"
    assert getattr(again.config, REMOVAL_RECORD)["removed_layers"] == [2, 3]


def test_the_inputs_are_left_unchanged_and_tied_embeddings_stay_frozen(teacher):
    pruned = remove_layers(teacher, [1, 4])
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    healed = heal(pruned, TRAIN, teacher=teacher, method="distill", steps=5, lr=1e-2,
                  progress=False)
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    emb = "model.embed_tokens.weight"
    assert torch.equal(healed.state_dict()[emb], before[emb])
    assert not torch.equal(healed.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])


def test_bridge_trains_only_the_blocks_next_to_a_gap(teacher):
    pruned = remove_layers(teacher, [2, 3])  # kept 0 1 4 5: block 1 bridges 2..3
    healed = heal(pruned, TRAIN, teacher=teacher, method="bridge", steps=5, lr=1e-2,
                  progress=False)
    changed = {int(k.split(".")[2]) for k, v in healed.state_dict().items()
               if k.startswith("model.layers.") and not torch.equal(v, pruned.state_dict()[k])}
    assert changed == {1}
    assert getattr(healed.config, HEALING_RECORD)["bridges"] == {"1": [1, 3]}


def test_same_seed_same_weights_other_seed_other_weights(teacher):
    pruned = remove_layers(teacher, [2, 3])
    runs = [heal(pruned, TRAIN, teacher=teacher, method="lora", steps=4, seed=s,
                 progress=False).state_dict() for s in (7, 7, 8)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_a_minutes_budget_takes_at_least_one_step(teacher):
    pruned = remove_layers(teacher, [2, 3])
    healed = heal(pruned, TRAIN, method="lora", minutes=1e-6, progress=False)
    assert getattr(healed.config, HEALING_RECORD)["steps"] == 1


def test_bridge_on_gemma3_uses_each_blocks_own_attention_type():
    """Gemma-3 alternates sliding-window and global layers, each with its own mask and
    rotary table: a bridging block must be trained with its own."""
    teacher = tiny_model("gemma3", layers=7)
    pruned = remove_layers(teacher, [4, 5])  # block 3 (sliding) bridges 4..5; 6 is global
    ids = pattern(16, seq_len=16, seed=3)
    healed = heal(pruned, ids, teacher=teacher, method="bridge", steps=3, progress=False)
    assert getattr(healed.config, HEALING_RECORD)["bridges"] == {"3": [3, 5]}
    # the recorded call of block 3 is the one it gets inside the pruned model: with the
    # block's weights unchanged, one bridging step from the teacher's state is exact
    from shortgpt_lite.healing import _teacher_states
    states = _teacher_states(teacher, ids, [torch.arange(4)], {3: (3, 3)}, False)
    x, target, (args, kwargs) = states[0][3]
    out = pruned.model.layers[3](x, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(out, target, atol=1e-6)


def test_bridge_segments():
    assert bridge_segments([2, 3], 6) == {1: (1, 3)}
    assert bridge_segments([0, 2, 5], 6) == {1: (0, 2), 4: (4, 5)}
    assert bridge_segments([0, 1], 4) == {2: (0, 2)}
    with pytest.raises(ValueError, match="Nothing to bridge"):
        bridge_segments([], 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "at least 1"),
    ({"minutes": 0}, "more than 0"),
    ({}, "Give heal a budget"),
    ({"steps": 2, "minutes": 1}, "one budget"),
    ({"steps": 2, "method": "prune-harder"}, "Unknown healing method"),
    ({"steps": 2, "method": "distill", "teacher": None}, "pass it as teacher"),
    ({"steps": 2, "windows": torch.zeros(0, 32, dtype=torch.long)}, "empty"),
    ({"steps": 2, "windows": None}, "LongTensor of token windows"),
])
def test_bad_input_is_refused_with_a_message(teacher, kwargs, message):
    call = {"windows": TRAIN, "teacher": teacher, "method": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        heal(remove_layers(teacher, [2]), call.pop("windows"), progress=False, **call)


def test_a_teacher_with_another_tokenizer_is_refused(teacher):
    other = tiny_llama(vocab_size=100, layers=6)
    with pytest.raises(ValueError, match="same tokenizer"):
        heal(remove_layers(teacher, [2]), TRAIN, teacher=other, method="distill", steps=1)


def test_bridge_needs_the_record_and_the_right_teacher(teacher):
    with pytest.raises(ValueError, match="needs to know which layers were removed"):
        heal(teacher, TRAIN, teacher=teacher, method="bridge", steps=1)
    with pytest.raises(ValueError, match="pass the model the layers were removed from"):
        heal(remove_layers(teacher, [2]), TRAIN, teacher=tiny_llama(layers=8), method="bridge",
             steps=1)


def test_logits_in_chunks_give_the_gradient_of_the_whole_batch(teacher, monkeypatch):
    """A large vocabulary is trained a few windows at a time, gradients summed: the same
    step as the whole batch at once, up to float rounding."""
    import shortgpt_lite.healing as heal_module

    # Plain SGD in place of AdamW: Adam divides each step by the gradient's own size, so a
    # rounding-level difference in a near-zero gradient turns into a whole step of either
    # sign, and the weights would differ by ~lr on some CPUs. SGD keeps the comparison at
    # the precision of the gradients themselves.
    monkeypatch.setattr(torch.optim, "AdamW",
                        lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    pruned = remove_layers(teacher, [2, 3])
    whole = heal(pruned, TRAIN, teacher=teacher, method="distill", steps=2, lr=1e-2,
                 progress=False).state_dict()
    monkeypatch.setattr(heal_module, "vocab_rows", lambda model: 2**27)  # one window a chunk
    parts = heal(pruned, TRAIN, teacher=teacher, method="distill", steps=2, lr=1e-2,
                 progress=False).state_dict()
    assert all(torch.allclose(whole[k], parts[k], atol=1e-5) for k in whole)
    assert not all(torch.equal(whole[k], pruned.state_dict()[k]) for k in whole)
