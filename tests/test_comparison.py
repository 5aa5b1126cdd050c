"""Every method on one budget: shortgpt_lite.comparison, resuming an interrupted run, and
the errors a user can cause."""

import math

import pytest
import torch

import shortgpt_lite.comparison as cmp
from shortgpt_lite.comparison import METHODS, compare, prune_to_budget
from shortgpt_lite.experiments import perplexity_ratio
from shortgpt_lite.wanda import prunable_parameters
from tiny import byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(layers=12, seed=0):
    return tiny_llama(vocab_size=257, layers=layers, tie=True, seed=seed)


SMALL = {"tasks": {"piqa": 2}, "corpora": ("wikipedia",), "calibration_windows": 2,
         "seq_len": 32, "ppl_windows": 2, "cost_seq_len": 8, "decode_tokens": 2, "repeats": 1,
         "progress": False}


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama(), byte_tokenizer()


# --------------------------------------------------------------------------- budgets


def test_depth_share_splits_the_budget_between_removal_and_wanda(tiny):
    model, _ = tiny
    windows = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    split = {d: prune_to_budget(model, "shortgpt+wanda", 0.25, windows=windows, depth_share=d,
                                progress=False) for d in (0.0, 0.5, 1.0)}
    # the model pruned from is left as it was, also when no layer is removed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    removed = {d: info["layers_removed"] for d, (_, info) in split.items()}
    assert removed[0.0] == [] and len(removed[0.5]) == round(0.125 * total / layer)
    assert len(removed[1.0]) == round(0.25 * total / layer) > len(removed[0.5])
    assert set(removed[0.5]) < set(removed[1.0])  # the lowest Block Influence go first
    wanda_alone, info = prune_to_budget(model, "wanda", 0.25, windows=windows, progress=False)
    assert split[0.0][1]["sparsity_of_linears"] == pytest.approx(info["sparsity_of_linears"])
    assert all(torch.equal(a, b) for a, b in zip(split[0.0][0].parameters(),
                                                 wanda_alone.parameters()))
    sparsities = [info["sparsity_of_linears"] for _, info in split.values()]
    assert sparsities[0] > sparsities[1] > sparsities[2] >= 0
    for pruned, _ in split.values():
        kept = sum(int((p != 0).sum()) for p in pruned.parameters())
        assert abs(1 - kept / total - 0.25) < 0.01


def test_every_method_meets_the_budget_as_closely_as_its_granularity_allows(tiny):
    model, tokenizer = tiny
    df = compare(model, tokenizer, budget=0.25, **SMALL)
    assert list(df["method"]) == list(METHODS)
    for column in ("params_total", "params_kept", "params_removed", "sparsity", "ppl_wikipedia",
                   "acc_piqa", "acc_mean", "size_bytes", "prefill_seconds",
                   "decode_tokens_per_s", "prune_seconds", "details"):
        assert column in df.columns, column
    rows = df.set_index("method")
    for method in ("dense", "shortgpt"):  # each window's NLL, for paired intervals
        nll = rows.loc[method, "nll_wikipedia"]
        assert len(nll) == SMALL["ppl_windows"]
        assert math.exp(sum(nll) / len(nll)) == pytest.approx(rows.loc[method, "ppl_wikipedia"])
    ratio = perplexity_ratio(rows.loc["shortgpt", "nll_wikipedia"],
                             rows.loc["dense", "nll_wikipedia"])
    assert ratio["ratio"] == pytest.approx(rows.loc["shortgpt", "ppl_wikipedia"]
                                           / rows.loc["dense", "ppl_wikipedia"])
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    neuron_row = 3 * 32 * 12  # one MLP neuron in every layer
    tolerance = {"shortgpt": layer / 2 / total, "shortgpt+int8": layer / 2 / total,
                 "wanda": 0.01, "magnitude": 0.01, "shortgpt+wanda": 0.01,
                 "context": neuron_row / 2 / total, "width": neuron_row / 2 / total}
    for method, tol in tolerance.items():
        assert abs(rows.loc[method, "params_removed"] - 0.25) <= tol + 1e-9, method
    assert rows.loc["dense", "params_removed"] == 0
    assert rows.loc["int8", "params_removed"] == 0
    half = 0.5 * prunable_parameters(model) / total  # 2:4 ignores the budget
    assert rows.loc["wanda-2:4", "params_removed"] == pytest.approx(half)
    # zeros count as removed, but stay present; removed layers and neurons are gone
    assert rows.loc["wanda", "params_total"] == total
    assert rows.loc["shortgpt", "params_total"] < total
    assert rows.loc["context", "params_total"] < total
    # width pruning removes neurons for real, so it saves bytes as layer removal does
    assert rows.loc["width", "params_total"] == rows.loc["width", "params_kept"] < total
    assert rows.loc["width", "size_bytes"] < 0.85 * rows.loc["dense", "size_bytes"]
    assert rows.loc["shortgpt+int8", "size_bytes"] < rows.loc["shortgpt", "size_bytes"]
    assert rows.loc["int8", "size_bytes"] < rows.loc["dense", "size_bytes"]
    assert all(math.isfinite(v) for v in df["ppl_wikipedia"])
    assert (df["acc_piqa_n"] == 2).all()
    assert ((df["acc_piqa_ci_low"] <= df["acc_piqa"]) & (df["acc_piqa"] <= df["acc_piqa_ci_high"])).all()
    assert (df["acc_piqa_ci_high"] - df["acc_piqa_ci_low"] > 0.3).all()  # two items say little
    assert (df["decode_tokens_per_s"] > 0).all()
    # the input model is untouched
    assert len(model.model.layers) == 12
    assert not (model.model.layers[0].mlp.up_proj.weight == 0).any()


# ---------------------------------------------------------------------------- resume


def test_an_interrupted_run_resumes_without_redoing_finished_methods(tiny, tmp_path,
                                                                     monkeypatch):
    model, tokenizer = tiny
    methods = ["dense", "magnitude", "shortgpt", "wanda"]
    real_measure = cmp._measure
    measured = []

    def measure(pruned, *args):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append(pruned)
        return real_measure(pruned, *args)

    monkeypatch.setattr(cmp, "_measure", measure)
    with pytest.raises(KeyboardInterrupt):
        compare(model, tokenizer, methods, results_dir=tmp_path, **SMALL)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["dense.json", "magnitude.json"]

    pruned_again = []
    real_prune = cmp.prune_to_budget

    def prune(model, method, *args, **kwargs):
        pruned_again.append(method)
        return real_prune(model, method, *args, **kwargs)

    measured.clear()
    monkeypatch.setattr(cmp, "_measure", lambda pruned, *a: measured.append(pruned)
                        or real_measure(pruned, *a))
    monkeypatch.setattr(cmp, "prune_to_budget", prune)
    first = compare(model, tokenizer, methods, results_dir=tmp_path, **SMALL)
    # every method is pruned for the timing, which needs them all together; only the two
    # the interrupted run did not finish are measured
    assert pruned_again == methods and len(measured) == 2
    assert list(first["method"]) == methods
    assert (first["timing_repeats"] == 1).all()

    pruned_again.clear()
    second = compare(model, tokenizer, methods, results_dir=tmp_path, **SMALL)
    assert pruned_again == []
    assert second.equals(first)
    # other settings: the saved rows do not apply and are recomputed
    compare(model, tokenizer, ["dense"], budget=0.2, results_dir=tmp_path, **SMALL)
    assert pruned_again == ["dense"]


# ------------------------------------------------------------------------- bad input


def test_bad_input_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="Unknown method"):
        compare(model, tokenizer, ["dense", "sparsegpt"], **SMALL)
    with pytest.raises(ValueError, match="No methods"):
        compare(model, tokenizer, [], **SMALL)
    for budget in (-0.1, 1.0):
        with pytest.raises(ValueError, match="budget"):
            compare(model, tokenizer, ["dense"], budget=budget, **SMALL)
    windows = torch.randint(0, 257, (2, 16))
    with pytest.raises(ValueError, match="smaller budget"):
        prune_to_budget(model, "wanda", 0.95, windows=windows, progress=False)
    with pytest.raises(ValueError, match="calibration windows"):
        prune_to_budget(model, "wanda", 0.25, progress=False)
    with pytest.raises(ValueError, match="domain"):
        prune_to_budget(model, "context", 0.25, progress=False)
    with pytest.raises(ValueError, match="calibration windows"):
        prune_to_budget(model, "width", 0.25, progress=False)
    with pytest.raises(ValueError, match="depth_share"):
        prune_to_budget(model, "shortgpt+wanda", 0.25, windows=windows, depth_share=1.5)
    with pytest.raises(ValueError, match="Unknown domain"):
        compare(model, tokenizer, ["context"], domain="astrology", **SMALL)
    with pytest.raises(ValueError, match="Unknown corpus"):
        compare(model, tokenizer, ["dense"], **{**SMALL, "corpora": ("poetry",)})
    with pytest.raises(ValueError, match="repeats"):
        compare(model, tokenizer, ["dense"], **{**SMALL, "repeats": -1})
    with pytest.raises(ValueError, match="positions"):  # before any method is pruned
        compare(model, tokenizer, ["dense"], **{**SMALL, "cost_seq_len": 10_000})


def test_the_methods_are_timed_together_at_the_end(tiny, monkeypatch):
    model, tokenizer = tiny
    timed = []
    real = cmp.speed_runs
    monkeypatch.setattr(cmp, "speed_runs", lambda models, *a, **k: timed.append(list(models))
                        or real(models, *a, **k))
    df = compare(model, tokenizer, ["dense", "wanda", "shortgpt"], **SMALL)
    assert timed == [["dense", "wanda", "shortgpt"]]  # one interleaved timing of all three
    assert (df["prefill_seconds"] > 0).all() and "prefill_spread" in df.columns
    untimed = compare(model, tokenizer, ["dense"], **{**SMALL, "repeats": 0})
    assert "prefill_seconds" not in untimed.columns and len(timed) == 1


# ------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_compare_on_smollm2(smollm2):
    model, tokenizer = smollm2
    df = compare(model, tokenizer, ["shortgpt", "wanda", "context", "shortgpt+int8"],
                 budget=0.25, tasks={}, corpora=("wikipedia",), calibration_windows=4,
                 seq_len=128, ppl_windows=2, cost_seq_len=32, decode_tokens=4, repeats=1,
                 progress=False).set_index("method")
    for method in ("shortgpt", "wanda", "context", "shortgpt+int8"):
        assert abs(df.loc[method, "params_removed"] - 0.25) < 0.015, method
    assert df.loc["shortgpt+int8", "size_bytes"] < 0.5 * df.loc["shortgpt", "size_bytes"]
    assert df["ppl_wikipedia"].map(math.isfinite).all()
    assert model.config.num_hidden_layers == 30


def test_int8_on_a_model_it_cannot_quantize_is_refused_before_any_work(monkeypatch):
    model, tokenizer = _tiny_llama(layers=4).to(torch.bfloat16), byte_tokenizer()
    pruned = []
    monkeypatch.setattr(cmp, "prune_to_budget", lambda *a, **k: pruned.append(a) or (None, {}))
    with pytest.raises(ValueError, match="int8, shortgpt\\+int8 need a CPU fp32 model"):
        compare(model, tokenizer, ["dense", "wanda", "int8", "shortgpt+int8"], **SMALL)
    assert pruned == []
    with pytest.raises(ValueError, match="CPU fp32"):
        prune_to_budget(model, "int8", 0.25)


def test_width_pruning_removes_the_quietest_neurons_of_the_calibration_text(tiny):
    model, _ = tiny
    windows = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(3))
    pruned, info = prune_to_budget(model, "width", 0.25, windows=windows, progress=False)
    neurons = info["mlp_neurons_removed_per_layer"]
    assert neurons > 0
    width = model.model.layers[0].mlp.up_proj.out_features
    plan = cmp.context_plan(cmp.context_statistics(model, windows, progress=False),
                            fraction=neurons / width, linear=False, embeddings=False)
    for i, (before, after) in enumerate(zip(model.model.layers, pruned.model.layers)):
        kept = (~plan.activation[i]).nonzero().flatten()
        assert after.mlp.up_proj.out_features == len(kept) == width - neurons
        assert torch.equal(after.mlp.up_proj.weight, before.mlp.up_proj.weight[kept])
        assert torch.equal(after.mlp.down_proj.weight, before.mlp.down_proj.weight[:, kept])
    # other text, other neurons: the plan is read from the windows it is given
    other = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(4))
    again, _ = prune_to_budget(model, "width", 0.25, windows=other, progress=False)
    assert any(not torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight)
               for a, b in zip(again.model.layers, pruned.model.layers))
