"""The reference-run machinery: run, resume, provenance, loading, and the checks that make a
hand-edited or stale stored result fail."""

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import shortgpt_lite as sgl
from shortgpt_lite import experiments as ex
from shortgpt_lite.cli import main
from tiny import byte_tokenizer, tiny_llama

SMALL = {"seq_len": 32, "calibration_windows": 2, "eval_windows": 3,
         "metrics": ["bi", "gromov", "ppl", "sequential", "random"], "random_seeds": 2,
         "max_remove": 2, "tasks": ["piqa", "winogrande"], "n_items": 3, "batch_size": 4}


@pytest.fixture
def tiny():
    return tiny_llama(vocab_size=257, layers=5), byte_tokenizer()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No stored result of the checkout or the user's cache leaks into a test."""
    monkeypatch.setenv("SHORTGPT_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ex.RESULTS_ENV, str(tmp_path / "stored"))
    monkeypatch.setattr(ex, "REPO_RESULTS", tmp_path / "no-repo-results")
    return tmp_path


def small_run(tiny, out, **params):
    return ex.run("removal", "tiny", out=out, loaded=tiny, progress=False, **{**SMALL, **params})


def test_a_run_stores_rows_per_window_and_item_with_provenance(tiny, isolated):
    r = small_run(tiny, isolated / "stored")
    assert r.path == isolated / "stored" / "tiny" / "removal"
    p = json.loads((r.path / "provenance.json").read_text())
    assert p["status"] == "complete" and p["key"] == ex.params_key(p["params"])
    assert p["params"]["max_remove"] == 2 and p["params"]["metrics"] == SMALL["metrics"]
    for field in ("shortgpt_lite", "commit", "torch", "transformers", "cpu", "machine"):
        assert field in p["environment"]
    assert p["device"] == "cpu" and p["dtype"] == "float32" and p["seconds"] >= 0
    assert p["command"].startswith("shortgpt-lite experiment removal --model tiny")
    orderings = ["bi", "gromov", "ppl", "sequential", "random:0", "random:1"]
    assert sorted(r["plans"]["ordering"].unique()) == sorted(orderings)
    # every distinct plan, the unpruned model included, on every window
    distinct = set(r["plans"]["removed"])
    assert set(r["ppl"]["removed"]) == distinct and len(r["ppl"]) == 3 * len(distinct)
    # accuracy at k = 0, the paper's share of 5 layers (round(5 * 9/32) = 1) and max_remove
    acc_plans = set(r["plans"][r["plans"]["k"].isin([0, 1, 2])]["removed"])
    assert set(r["items"]["removed"]) == acc_plans
    assert len(r["items"]) == 6 * len(acc_plans)
    assert r.caption.startswith("Reference run: `shortgpt-lite experiment removal --model tiny")


def test_the_commit_is_dirty_for_changed_code_not_for_rewritten_results(tmp_path):
    import subprocess

    from shortgpt_lite.provenance import git_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "ppl.csv").write_text("nll\n1.0\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "results" / "ppl.csv").unlink()  # a run rewriting its own tables
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"


def test_accuracy_seeds_scores_the_items_for_the_first_seeds_only(tiny, isolated):
    r = small_run(tiny, isolated / "stored", metrics=["bi", "random"], random_seeds=3,
                  accuracy_seeds=1)
    plans = r["plans"]
    at = plans[plans["k"] == 2].set_index("ordering")["removed"]
    assert set(plans["ordering"]) == {"bi", "random:0", "random:1", "random:2"}
    # every seed's plans have perplexity; only random:0's and bi's have items
    assert set(r["ppl"]["removed"]) == set(plans["removed"])
    scored = set(r["items"]["removed"])
    assert {at["bi"], at["random:0"]} <= scored
    assert not ({at["random:1"], at["random:2"]} - {at["bi"], at["random:0"]}) & scored
    pruned = set(sgl.accuracy_table(r).query("k > 0")["ordering"])  # k = 0 is shared by all
    assert "random:0" in pruned and "random:1" not in pruned


def test_gromov_removes_one_contiguous_run_at_the_smallest_distance():
    scores = pd.DataFrame({"ordering": "gromov", "run_length": [1, 1, 1, 2, 2],
                           "layer": [0, 1, 2, 0, 1], "score": [0.3, 0.1, 0.2, 0.4, 0.25]})
    assert ex.removal_plan(scores, "gromov", 1) == [1]
    assert ex.removal_plan(scores, "gromov", 2) == [1, 2]
    assert ex.removal_plan(scores, "gromov", 0) == []


def interrupted_run(tiny, out, monkeypatch, at_call: int) -> None:
    """A small removal run into ``out`` stopped by Ctrl-C in its ``at_call``-th scoring of
    items, as a user interrupts one."""
    calls = {"n": 0}
    real = ex._item_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_item_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        small_run(tiny, out)
    monkeypatch.setattr(ex, "_item_rows", real)


def test_an_interrupted_run_resumes_from_the_rows_written(tiny, isolated, monkeypatch):
    whole = small_run(tiny, isolated / "whole")
    interrupted_run(tiny, isolated / "resumed", monkeypatch, at_call=3)
    meta = json.loads((isolated / "resumed" / "tiny" / "removal" / "provenance.json").read_text())
    assert meta["status"] == "running"
    resumed = small_run(tiny, isolated / "resumed")
    for table in ("ppl", "items"):
        a = whole[table].sort_values(["removed", *whole[table].columns[1:3]]).reset_index(drop=True)
        b = resumed[table].sort_values(["removed", *a.columns[1:3]]).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)


def test_an_unfinished_run_is_not_finished_in_another_precision(tiny, isolated, monkeypatch):
    interrupted_run(tiny, isolated / "resumed", monkeypatch, at_call=2)
    folder = isolated / "resumed" / "tiny" / "removal"
    written = {f.name: f.read_bytes() for f in folder.glob("*.csv")}
    assert written
    model, tokenizer = tiny
    half = (copy.deepcopy(model).to(torch.bfloat16), tokenizer)
    with pytest.raises(ValueError, match="unfinished run in float32 on cpu.*dtype='float32'"):
        ex.run("removal", "tiny", out=isolated / "resumed", loaded=half, progress=False,
               **SMALL)
    assert {f.name: f.read_bytes() for f in folder.glob("*.csv")} == written  # nothing lost
    redone = ex.run("removal", "tiny", out=isolated / "resumed", loaded=half, progress=False,
                    overwrite=True, **SMALL)
    assert redone.provenance["dtype"] == "bfloat16" and redone.provenance["status"] == "complete"
    whole = small_run(tiny, isolated / "whole")
    assert len(redone["ppl"]) == len(whole["ppl"]) and len(redone["items"]) == len(whole["items"])


def test_other_parameters_do_not_overwrite_a_stored_run(tiny, isolated):
    small_run(tiny, isolated / "stored")
    with pytest.raises(FileExistsError, match="other parameters"):
        small_run(tiny, isolated / "stored", max_remove=1)
    r = small_run(tiny, isolated / "stored", max_remove=1, overwrite=True)
    assert r.params["max_remove"] == 1 and r["plans"]["k"].max() == 1


def test_unknown_parameters_and_experiments_are_refused():
    with pytest.raises(ValueError, match="no parameter windows"):
        ex.standard_params("removal", "x") | ex.EXPERIMENTS["removal"].params({"windows": 3})
    with pytest.raises(ValueError, match="Unknown experiment"):
        ex.standard_params("curves", "x")


def test_reference_loads_exactly_matching_parameters_and_computes_others(tiny, isolated):
    stored = small_run(tiny, isolated / "stored")
    loaded = ex.reference("removal", "tiny", loaded=tiny, progress=False, **SMALL)
    assert loaded.path == stored.path
    other = ex.reference("removal", "tiny", loaded=tiny, progress=False, **{**SMALL,
                                                                          "max_remove": 1})
    key = ex.params_key(other.params)
    assert other.path == isolated / "cache" / "results" / key / "tiny" / "removal"
    assert other.params["max_remove"] == 1
    # a third parameter set sits beside the second, and the second is found again
    third = ex.reference("removal", "tiny", loaded=tiny, progress=False, **{**SMALL,
                                                                          "max_remove": 3})
    assert third.path != other.path and third.params["max_remove"] == 3
    again = ex.reference("removal", "tiny", loaded=tiny, progress=False, **{**SMALL,
                                                                          "max_remove": 1})
    assert again.path == other.path


def test_check_passes_a_fresh_run_and_fails_edited_or_stale_ones(tiny, isolated):
    r = small_run(tiny, isolated / "stored")
    assert ex.check(r, loaded=tiny) == []

    edited = ex.load_result(r.path)
    edited.params = {**edited.params, "n_items": 4}
    assert "do not match the result's key" in ex.check(edited, loaded=tiny)[0]

    edited = ex.load_result(r.path)
    plans = edited["plans"]
    plans.loc[(plans["ordering"] == "bi") & (plans["k"] == 1), "removed"] = "0"
    assert any("does not follow from the stored scores" in p
               for p in ex.check(edited, loaded=tiny))

    stale = ex.load_result(r.path)
    stale["ppl"]["nll"] += 0.01
    assert any("window NLL moved" in p for p in ex.check(stale, loaded=tiny))

    stale = ex.load_result(r.path)
    items = stale["items"]
    items["loglikelihoods"] = items["loglikelihoods"].map(
        lambda s: " ".join(str(float(x) - 0.5 * i) for i, x in enumerate(s.split())))
    assert any("log-likelihoods" in p for p in ex.check(stale, loaded=tiny))

    stale = ex.load_result(r.path)
    bi = stale["scores"]["ordering"] == "bi"
    stale["scores"].loc[bi, "score"] = stale["scores"].loc[bi, "score"] + 0.01
    assert any("BI scores moved" in p for p in ex.check(stale, loaded=tiny))


def test_paired_difference_cancels_what_both_share():
    units = pd.Series([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    a, b = units + 1.0, units.copy()
    d = ex.paired_difference(a, b)
    assert d["mean"] == pytest.approx(1.0) and d["low"] == pytest.approx(1.0)
    assert not d["zero_inside"] and d["n"] == 6
    same = ex.paired_difference(units + pd.Series([1, -1, 1, -1, 1, -1.0]), units)
    assert same["zero_inside"]
    with pytest.raises(ValueError, match="share no index"):
        ex.paired_difference(pd.Series([1.0], index=[0]), pd.Series([1.0], index=[1]))


def test_perplexity_ratio_is_the_ratio_of_the_two_perplexities():
    rng = np.random.default_rng(0)
    nll_b = rng.uniform(2.0, 4.0, 16)
    nll_a = nll_b + rng.normal(0.3, 0.05, 16)  # a costs about exp(0.3) = x1.35 per window
    r = ex.perplexity_ratio(nll_a, nll_b)
    assert r["ratio"] == pytest.approx(math.exp(nll_a.mean()) / math.exp(nll_b.mean()))
    assert 1 < r["ratio_low"] < r["ratio"] < r["ratio_high"] and not r["zero_inside"]
    assert ex.perplexity_ratio(nll_b, nll_a)["ratio"] == pytest.approx(1 / r["ratio"])


def test_paired_speedups_pair_each_repeat_with_the_reference():
    # every repeat is slower or faster as a whole (load); b is always 2x faster than a
    load = [1.0, 1.5, 1.2, 3.0, 1.1]
    runs = pd.DataFrame([{"model": m, "repeat": r, "prefill_seconds": x * f,
                          "decode_tokens_per_s": 10 / (x * f)}
                         for r, x in enumerate(load) for m, f in (("a", 1.0), ("b", 0.5))])
    s = ex.paired_speedups(runs, "a")
    assert list(s.index) == ["b"]
    for what in ("prefill", "decode"):  # the load cancels: exactly x2, with no spread at all
        assert s.loc["b", [what, f"{what}_low", f"{what}_high"]].tolist() == pytest.approx([2.0] * 3)
    assert ex.paired_speedups(runs, "b").loc["a", "prefill"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="No timed model 'c'"):
        ex.paired_speedups(runs, "c")


def test_cli_parses_parameters_by_their_default_types_and_refuses_unknown_ones(monkeypatch):
    from shortgpt_lite.cli import _experiment_params

    assert _experiment_params("removal", ["--max-remove", "6", "--tasks", "piqa,boolq",
                                          "--corpus", "code"]) == {
        "max_remove": 6, "tasks": ["piqa", "boolq"], "corpus": "code"}
    assert _experiment_params("comparison", ["--budgets", "0.1,0.25"]) == {"budgets": [0.1, 0.25]}
    with pytest.raises(SystemExit, match="--windows is not a parameter of removal"):
        main(["experiment", "removal", "--windows", "3"])
    with pytest.raises(SystemExit, match="Unknown experiment 'curves'"):
        main(["experiment", "curves"])
    with pytest.raises(SystemExit, match="takes no others"):
        main(["experiment", "all", "--max-remove", "3"])


def test_experiment_help_names_every_experiment(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ex.EXPERIMENTS)


def test_the_library_exports_the_loader():
    assert sgl.reference is ex.reference and sgl.paired_difference is ex.paired_difference


def test_block_influence_rows_per_window_and_layer_and_the_post_norm_last_block(tiny, isolated):
    r = ex.run("block_influence", "tiny", out=isolated / "stored", loaded=tiny, progress=False,
               corpora=["wikipedia", "code"], seq_len=32, windows=3)
    assert len(r["windows"]) == 2 * 3 * 5 and len(r["last_block"]) == 2 * 3
    model, _ = tiny
    w = sgl.token_windows(tiny[1], sgl.load_text("code", "calibration"), 32, 3)
    bi = r["windows"][r["windows"]["corpus"] == "code"].groupby("layer")["bi"].mean()
    assert bi.to_numpy() == pytest.approx(sgl.block_influence(model, w, progress=False).numpy(),
                                          abs=1e-5)
    hook = r["last_block"].set_index(["corpus", "window"])["bi_hook"]
    last = r["windows"][r["windows"]["layer"] == 4].set_index(["corpus", "window"])["bi"]
    assert hook.to_numpy() == pytest.approx(last.loc[hook.index].to_numpy())
    assert (r["last_block"]["bi_hidden_states"] != r["last_block"]["bi_hook"]).all()
    assert ex.check(r, loaded=tiny) == []
    r["windows"].loc[0, "bi"] += 0.01
    assert any("bi moved" in p for p in ex.check(r, loaded=tiny))


COMPARE = {"methods": ["dense", "shortgpt", "wanda", "context"], "budgets": [0.1, 0.2],
           "corpora": ["wikipedia", "code"], "seq_len": 32, "calibration_windows": 2,
           "eval_windows": 3, "tasks": ["piqa", "winogrande"], "n_items": 3, "batch_size": 4}


def test_comparison_measures_every_method_at_every_budget_on_the_same_units(tiny, isolated):
    r = ex.run("comparison", "tiny", out=isolated / "stored", loaded=tiny, progress=False,
               **COMPARE)
    v = r["variants"].set_index("variant")
    assert list(v.index) == ["dense", "shortgpt@0.1", "wanda@0.1", "context@0.1",
                             "shortgpt@0.2", "wanda@0.2", "context@0.2"]
    assert v.loc["dense", "params_removed"] == 0 and v.loc["dense", "budget"] == 0
    # zeroed weights keep the file as large; removed layers and neurons shrink it
    assert v.loc["wanda@0.2", "file_bytes"] == v.loc["dense", "file_bytes"]
    assert v.loc["context@0.2", "file_bytes"] < v.loc["context@0.1", "file_bytes"] \
        < v.loc["dense", "file_bytes"]
    assert abs(v.loc["wanda@0.2", "params_removed"] - 0.2) < 0.01
    assert v.loc["shortgpt@0.2", "layers"] < 5
    # every variant on the same windows of every corpus and on the same items
    assert len(r["ppl"]) == 7 * 2 * 3 and len(r["items"]) == 7 * 6
    assert r["ppl"].groupby("variant").size().eq(6).all()
    assert r["items"].groupby("variant")["item"].apply(list).map(tuple).nunique() == 1
    assert ex.check(r, loaded=tiny) == []
    stale = ex.load_result(r.path)
    stale["variants"].loc[stale["variants"]["variant"] == "shortgpt@0.1", "params_total"] += 1
    assert any("params_total" in p for p in ex.check(stale, loaded=tiny))
    stale = ex.load_result(r.path)
    stale["ppl"]["nll"] += 0.01
    assert any("window NLL moved" in p for p in ex.check(stale, loaded=tiny))


WANDA = {"seq_len": 32, "calibration_windows": 4, "eval_windows": 3, "sweep": [0.3],
         "calibration_sizes": [1, 4, 8], "tasks": ["piqa", "winogrande"], "n_items": 3,
         "batch_size": 4}


def test_wanda_crosses_score_and_group_and_measures_every_copy_on_the_same_units(tiny, isolated):
    r = ex.run("wanda", "tiny", out=isolated / "stored", loaded=tiny, progress=False, **WANDA)
    v = r["variants"].set_index("variant")
    grid = ["magnitude/layer@0.5", "magnitude/row@0.5", "wanda/layer@0.5", "wanda/row@0.5"]
    nm = ["magnitude/row@4:8", "wanda/row@4:8", "magnitude/row@2:4", "wanda/row@2:4"]
    # the curve runs each rule as the paper does; sizes at or above the full set are skipped
    rest = ["magnitude/layer@0.3", "wanda/row@0.3", "wanda/row@0.5+cal1"]
    assert list(v.index) == ["dense", *grid, *nm, *rest]
    assert v.loc["dense", "sparsity"] == pytest.approx(0, abs=1e-3)
    assert (v.loc[grid + nm, "sparsity"] - 0.5).abs().max() < 1e-3
    assert v.loc["wanda/row@0.3", "sparsity"] == pytest.approx(0.3, abs=1e-2)
    assert v.loc["wanda/row@0.5+cal1", "calibration_windows"] == 1
    assert v.loc["wanda/row@0.5", "calibration_windows"] == 4
    # every copy on the same windows; the 2x2 and N:M on the same items, the others on none
    assert r["ppl"].groupby("variant").size().eq(3).all() and len(r["ppl"]) == 3 * len(v)
    assert set(r["items"]["variant"]) == {"dense", *grid, *nm}
    assert r["items"].groupby("variant")["item"].apply(list).map(tuple).nunique() == 1
    # read in pairs: accuracy only where both copies were scored on the items
    both = sgl.compare_variants(r, "wanda/row@0.5", "magnitude/layer@0.5")
    assert both["ppl"]["n"] == 3 and both["acc"]["n"] == 6
    assert sgl.compare_variants(r, "wanda/row@0.3", "dense")["acc"] is None
    # the stored copies are the library's: magnitude per row, pruned again, gives the same NLL
    model, _ = tiny
    pruned = sgl.magnitude_prune(model, 0.5, per="row", progress=False)
    nll = sgl.perplexity(pruned, sgl.token_windows(tiny[1], sgl.load_text("wikipedia", "evaluation"),
                                                   32, 3), progress=False, per_window=True)
    stored = r["ppl"][r["ppl"]["variant"] == "magnitude/row@0.5"]["nll"].to_numpy()
    assert stored == pytest.approx(nll["nll_per_window"], abs=1e-5)
    assert ex.check(r, loaded=tiny) == []
    stale = ex.load_result(r.path)
    stale["ppl"].loc[stale["ppl"]["variant"] == "wanda/row@0.5", "nll"] *= 1.05
    assert any("wanda/row@0.5: window NLL moved" in p for p in ex.check(stale, loaded=tiny))
    # Wanda's masks may move among near-tied scores on another CPU, magnitude's may not: a
    # 0.5% change of every log-likelihood is within Wanda's tolerance and beyond magnitude's
    stale = ex.load_result(r.path)
    stale["items"]["loglikelihoods"] = [" ".join(f"{float(x) * 1.005:.6f}" for x in ll.split())
                                        for ll in stale["items"]["loglikelihoods"]]
    problems = ex.check(stale, loaded=tiny)
    assert any("'magnitude/layer@0.5', item" in p for p in problems)
    assert not any("'wanda/row@0.5', item" in p for p in problems)
    stale = ex.load_result(r.path)
    stale["variants"].loc[stale["variants"]["variant"] == "magnitude/layer@0.5", "sparsity"] -= 0.1
    assert any("magnitude/layer@0.5: sparsity" in p for p in ex.check(stale, loaded=tiny))


def test_costs_time_every_copy_together_and_flag_a_busy_machine(tiny, isolated):
    params = {"methods": ["dense", "shortgpt", "wanda", "context"], "budgets": [0.2],
              "seq_len": 32, "calibration_windows": 2, "prompt_tokens": 8, "decode_tokens": 2,
              "repeats": 2}
    r = ex.run("costs", "tiny", out=isolated / "stored", loaded=tiny, progress=False, **params)
    v = r["variants"].set_index("variant")
    assert list(v.index) == ["dense", "shortgpt@0.2", "wanda@0.2", "context@0.2"]
    assert v.loc["wanda@0.2", "file_bytes"] == v.loc["dense", "file_bytes"]
    assert v.loc["shortgpt@0.2", "file_bytes"] < v.loc["dense", "file_bytes"]
    t = r["timings"]
    assert len(t) == 4 * 2 and t.groupby("variant").size().eq(2).all()
    # interleaved: the order of the second repeat is the first's reversed
    first = t[t["repeat"] == 0].sort_values("position")["variant"].tolist()
    assert t[t["repeat"] == 1].sort_values("position")["variant"].tolist() == first[::-1]
    assert (t["prefill_seconds"] > 0).all() and (t["decode_tokens_per_s"] > 0).all()
    # a tiny model's timings are noise, so the check is shown on timings set by hand
    quiet = ex.load_result(r.path)
    dense = quiet["timings"][quiet["timings"]["variant"] == "dense"].set_index("repeat")
    same = quiet["timings"]["variant"] == "wanda@0.2"
    quiet["timings"].loc[same, "prefill_seconds"] = dense.loc[
        quiet["timings"].loc[same, "repeat"], "prefill_seconds"].to_numpy()
    assert ex.check(quiet, loaded=tiny) == []
    busy = ex.load_result(quiet.path)
    busy.tables["timings"] = quiet["timings"].copy()
    busy["timings"].loc[same, "prefill_seconds"] *= 1.5
    assert any("was not idle" in p for p in ex.check(busy, loaded=tiny))
    busy.tables["timings"] = quiet["timings"][quiet["timings"]["repeat"] == 0]
    assert any("expected 2 runs" in p for p in ex.check(busy, loaded=tiny))
    quiet["variants"].loc[quiet["variants"]["variant"] == "shortgpt@0.2", "file_bytes"] += 1
    assert any("file_bytes" in p for p in ex.check(quiet, loaded=tiny))


def test_an_interrupted_comparison_resumes_without_repeating_rows(tiny, isolated, monkeypatch):
    calls = []
    real = ex._item_rows

    def interrupted(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_item_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.run("comparison", "tiny", out=isolated / "a", loaded=tiny, progress=False, **COMPARE)
    monkeypatch.setattr(ex, "_item_rows", real)
    resumed = ex.run("comparison", "tiny", out=isolated / "a", loaded=tiny, progress=False,
                     **COMPARE)
    fresh = ex.run("comparison", "tiny", out=isolated / "b", loaded=tiny, progress=False,
                   **COMPARE)
    for table in ("variants", "ppl", "items"):
        a = resumed[table].sort_values(list(resumed[table].columns[:3])).reset_index(drop=True)
        b = fresh[table].sort_values(list(fresh[table].columns[:3])).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)


HEALING = {"seq_len": 32, "calibration_windows": 2, "train_windows": 8, "eval_windows": 3,
           "plans": ["bi", "reverse"], "recipes": ["lora", "bridge"], "steps": [4, 2],
           "checkpoints": 2, "heal_batch_size": 2, "tasks": ["piqa"], "n_items": 3,
           "batch_size": 4, "lambada_items": 3, "max_new_tokens": 3}


def test_healing_records_a_recovery_curve_per_run_on_the_same_units(tiny, isolated):
    r = ex.run("healing", "tiny", out=isolated / "stored", loaded=tiny, progress=False,
               **HEALING)
    runs = r["runs"]
    # the first plan by every recipe, the other plan and Wanda by the first recipe
    assert list(dict.fromkeys(runs["run"])) == ["bi/lora", "bi/bridge", "reverse/lora",
                                                "wanda/lora"]
    assert runs.groupby("run")["step"].apply(list).to_dict() == {
        "bi/lora": [2, 4], "bi/bridge": [1, 2], "reverse/lora": [4], "wanda/lora": [4]}
    # Wanda removes as large a share of the parameters as the first plan's removed layers
    share = float(runs[runs["ordering"] == "wanda"]["removed"].iloc[0].partition("@")[2])
    one = ex.param_counts(ex.remove_layers(tiny[0], [0]))[0] / ex.param_counts(tiny[0])[0]
    assert share == pytest.approx(1 - one, abs=1e-4)
    assert (runs.groupby("run")["seconds"].diff().dropna() > 0).all()
    assert runs[runs["ordering"] == "reverse"]["removed"].iloc[0] == "4"  # the last block
    ppl = r["ppl"]
    assert ppl.groupby(["run", "step"]).size().eq(3).all()
    # the first plan's recipes at every checkpoint, the other runs before and after
    assert set(ppl[ppl["run"] == "bi/lora"]["step"]) == {0, 2, 4}
    assert set(ppl[ppl["run"] == "wanda/lora"]["step"]) == {0, 4}
    # both recipes start from the same pruned model, and training moves it
    first = ppl[ppl["step"] == 0].pivot(index="window", columns="run", values="nll")
    assert (first["bi/lora"] == first["bi/bridge"]).all()
    assert not (first["bi/lora"] == first["dense"]).all()
    end = ppl[(ppl["run"] == "bi/lora") & (ppl["step"] == 4)]["nll"].to_numpy()
    assert not np.allclose(end, first["bi/lora"].to_numpy())
    items = r["items"]
    assert items.groupby(["run", "step"]).size().eq(3).all()
    assert set(items[items["run"] == "bi/bridge"]["step"]) == {0, 2}
    # accuracy for the first plan and the width methods only
    assert set(items["run"]) == {"dense", "bi/lora", "bi/bridge", "wanda/lora"}
    # the first healed model on LAMBADA and the prompts, on the first plan
    assert len(r["lambada"]) == 3 and set(r["lambada"]["run"]) == {"bi/lora"}
    assert r["lambada"]["removed"].iloc[0] == runs["removed"].iloc[0]
    assert set(r["samples"]["run"]) == {"bi/lora"}
    # and pairs with a generation run of the same plan and passages
    gen = ex.run("generation", "tiny", out=isolated / "gen", loaded=tiny, progress=False,
                 **{**GENERATION, "n_items": 3})
    assert list(sgl.generation_table(gen, r).index) == ["dense", "removed", "shortgpt-gen",
                                                        "healed"]
    assert ex.check(r, loaded=tiny) == []
    stale = ex.load_result(r.path)
    stale["ppl"].loc[stale["ppl"]["step"] == 0, "nll"] += 0.01
    assert any("before healing moved" in p for p in ex.check(stale, loaded=tiny))
    with pytest.raises(ValueError, match="one number of steps per recipe"):
        ex.run("healing", "tiny", out=isolated / "other", loaded=tiny, progress=False,
               **{**HEALING, "steps": [4]})
    with pytest.raises(ValueError, match="multiple of checkpoints"):
        ex.run("healing", "tiny", out=isolated / "other", loaded=tiny, progress=False,
               **{**HEALING, "steps": [3, 2]})
    with pytest.raises(ValueError, match="no gap to bridge"):
        ex.run("healing", "tiny", out=isolated / "other", loaded=tiny, progress=False,
               **{**HEALING, "recipes": ["bridge", "lora"]})


def test_a_resumed_healing_run_decodes_lambada_once(tiny, isolated, monkeypatch):
    params = {**HEALING, "plans": ["bi"], "recipes": ["lora"], "steps": [4], "width": []}
    real_samples, real_decode, decoded = ex.generation_samples, ex.decoded_accuracy, []

    def interrupted(*args, **kwargs):  # LAMBADA is written, the continuations are not
        raise KeyboardInterrupt

    def counted(*args, **kwargs):
        decoded.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(ex, "generation_samples", interrupted)
    monkeypatch.setattr(ex, "decoded_accuracy", counted)
    with pytest.raises(KeyboardInterrupt):
        ex.run("healing", "tiny", out=isolated, loaded=tiny, progress=False, **params)
    assert len(pd.read_csv(isolated / "tiny" / "healing" / "lambada.csv")) == 3
    monkeypatch.setattr(ex, "generation_samples", real_samples)
    r = ex.run("healing", "tiny", out=isolated, loaded=tiny, progress=False, **params)
    assert len(decoded) == 1  # not decoded again on resume
    assert len(r["lambada"]) == 3 and len(r["samples"]) == r["samples"]["prompt"].nunique()
    assert r["ppl"].groupby(["run", "step"]).size().eq(3).all()
    assert ex.check(r, loaded=tiny) == []


GENERATION = {"seq_len": 32, "calibration_windows": 2, "n_items": 4, "max_new_tokens": 4,
              "prompt_tokens": 16, "decode_tokens": 4, "repeats": 2}


def test_generation_decodes_every_model_on_the_same_items(tiny, isolated):
    r = ex.run("generation", "tiny", out=isolated / "stored", loaded=tiny, progress=False,
               **GENERATION)
    models = ["dense", "removed", "shortgpt-gen"]
    assert r["items"].groupby("model").size().to_dict() == dict.fromkeys(models, 4)
    assert set(r["samples"]["model"]) == set(models)
    assert r["timings"].groupby("variant").size().to_dict() == dict.fromkeys(models, 2)
    assert r["items"]["removed"].nunique() == 1
    assert ex.check(r, loaded=tiny) == []
    stale = ex.load_result(r.path)
    dense = stale["items"]["model"] == "dense"
    stale["items"].loc[dense, "correct"] = ~stale["items"].loc[dense, "correct"].astype(bool)
    assert any("dense: 4 of" in p for p in ex.check(stale, loaded=tiny))


CONTEXT = {"domains": ["law", "code"], "seq_len": 32, "calibration_windows": 4,
           "eval_windows": 3, "tasks": ["piqa", "winogrande"], "n_items": 3, "prompt_tokens": 8,
           "decode_tokens": 2, "repeats": 2, "batch_size": 4}


def test_context_plans_every_text_and_its_halves_and_measures_every_plan_on_the_same_units(
        tiny, isolated):
    r = ex.run("context", "tiny", out=isolated / "stored", loaded=tiny, progress=False, **CONTEXT)
    model, tokenizer = tiny
    texts = ["law", "code", "wikipedia"]
    plans = sgl.context_plans(r)
    assert list(plans) == [n for t in texts for n in (t, f"{t}/1", f"{t}/2")] + ["random"]
    width = model.config.intermediate_size
    for plan in plans.values():
        assert [int(m.sum()) for m in plan.activation.values()] == [round(0.25 * width)] * 5
    # the stored plan is the library's, from the same windows
    windows = sgl.token_windows(tokenizer, sgl.load_text("code", "calibration"), 32, 4)
    fresh = sgl.context_plan(sgl.context_statistics(model, windows, progress=False),
                             fraction=0.25, linear=False, embeddings=False)
    assert all(torch.equal(fresh.activation[b], plans["code"].activation[b]) for b in range(5))
    # the random plan prunes as many neurons per layer, elsewhere
    assert not all(torch.equal(plans["random"].activation[b], plans["law"].activation[b])
                   for b in range(5))
    # every model on the same windows of every text and on the same items
    models = ["unpruned", *texts, "random"]
    assert r["variants"]["variant"].tolist() == models
    assert r["ppl"].groupby(["variant", "corpus"]).size().eq(3).all() and len(r["ppl"]) == 5 * 3 * 3
    assert r["items"].groupby("variant")["item"].apply(tuple).nunique() == 1
    assert sgl.compare_variants(r, "law", "unpruned", corpus="code")["acc"]["n"] == 6
    # physical removal: fewer parameters; its NLL is the one the stored plan gives
    v = r["variants"].set_index("variant")
    assert (v.loc[texts + ["random"], "params_total"] < v.loc["unpruned", "params_total"]).all()
    pruned = sgl.context_prune(model, plans["law"], physical=True, progress=False)
    ev = sgl.token_windows(tokenizer, sgl.load_text("wikipedia", "evaluation"), 32, 3)
    nll = sgl.perplexity(pruned, ev, progress=False, per_window=True)["nll_per_window"]
    stored = r["ppl"].query("variant == 'law' and corpus == 'wikipedia'")["nll"].to_numpy()
    assert stored == pytest.approx(nll, abs=1e-5)
    # the statistic's spread, quiet counts under both rules, vocabulary coverage
    assert set(r["spread"]["text"]) == set(texts) and len(r["spread"]) == 3 * 5 * 3
    assert set(r["quiet"]["rule"]) == {"normalised", "raw"}
    assert (r["quiet"]["quiet"] <= width).all()
    assert r["vocabulary"].set_index("text").loc["law", "tokens"] == 4 * 32
    # costs: zeroing keeps the file, removal shrinks it, the vocabulary cut shrinks it more
    size = r["sizes"].set_index("model")["file_bytes"]
    assert size["zero-masked"] == size["unpruned"] > size["physical"] > size["physical + vocabulary"]
    assert r["timings"].groupby("model").size().eq(2).all()
    # the check: a faithful run passes; a moved NLL, a changed plan and a busy machine fail
    problems = ex.check(r, loaded=tiny)
    assert [p for p in problems if "machine was not idle" not in p] == []
    stale = ex.load_result(r.path)
    stale["ppl"].loc[stale["ppl"]["variant"] == "law", "nll"] += 0.01
    assert any("law: window NLL moved" in p for p in ex.check(stale, loaded=tiny))
    stale = ex.load_result(r.path)
    first = stale["plans"].index[(stale["plans"]["plan"] == "law")][0]
    stale["plans"].loc[first, "pruned"] = " ".join(str(i) for i in range(round(0.25 * width)))
    assert any("plan 'law': only" in p for p in ex.check(stale, loaded=tiny))
    stale = ex.load_result(r.path)
    stale["timings"].loc[stale["timings"]["model"] == "zero-masked", "prefill_seconds"] *= 3
    assert any("zero-masked has the unpruned model's compute" in p
               for p in ex.check(stale, loaded=tiny))


def test_context_refuses_what_it_cannot_run(tiny, isolated):
    with pytest.raises(ValueError, match="domains must be some of"):
        ex.run("context", "tiny", out=isolated, loaded=tiny, **{**CONTEXT, "domains": ["cooking"]})
    with pytest.raises(ValueError, match="at least 2"):
        ex.run("context", "tiny", out=isolated, loaded=tiny,
               **{**CONTEXT, "calibration_windows": 1})
    with pytest.raises(ValueError, match="Too little text"):
        ex.run("context", "tiny", out=isolated, loaded=tiny,
               **{**CONTEXT, "seq_len": 4096, "eval_windows": 10**4})


COMBINING = {"seq_len": 32, "calibration_windows": 2, "eval_windows": 3, "ks": [0, 1, 2],
             "sparsities": [0.0, 0.5], "budget": 0.25, "tasks": ["piqa", "winogrande"],
             "n_items": 3, "prompt_tokens": 8, "decode_tokens": 2, "repeats": 2, "batch_size": 4}


def test_combining_crosses_removal_with_wanda_and_int8_and_splits_a_budget(tiny, isolated):
    r = ex.run("combining", "tiny", out=isolated / "stored", loaded=tiny, progress=False,
               **COMBINING)
    model, tokenizer = tiny
    v = r["variants"].set_index("variant")
    k_full = int(v.loc[sgl.budget_variant(1.0), "k"])
    grid = [sgl.combining_variant(k, s) for k in (0, 1, 2) for s in (0.0, 0.5)]
    int8 = [sgl.combining_variant(0, int8=kind) for kind in ex.INT8_KINDS]
    stacked = [sgl.combining_variant(k, int8=kind) for k in (1, 2)
               for kind in ("dynamic/tensor", "weights/channel")]
    assert grid[:2] == ["k=0", "k=0+wanda@0.5"] and set(grid + int8 + stacked) <= set(v.index)
    assert [sgl.budget_variant(d) for d in (0.0, 0.5, 1.0)] == list(v.index[-3:])
    # every copy on the same windows; the unpruned, stacked int8 and budget copies on the items
    assert r["ppl"].groupby("variant").size().eq(3).all() and set(r["ppl"]["variant"]) == set(v.index)
    scored = ["k=0", int8[0], int8[3], *v.index[-3:]]
    assert sorted(set(r["items"]["variant"])) == sorted(scored)
    assert r["items"].groupby("variant")["item"].apply(tuple).nunique() == 1
    # a stored NLL is the library's: Wanda calibrated after the removal, on the shorter model
    windows = sgl.token_windows(tokenizer, sgl.load_text("wikipedia", "calibration"), 32, 2)
    scores = r["scores"]["bi"].tolist()
    assert scores == pytest.approx(sgl.layer_importance(model, windows, "bi", progress=False))
    shallow = sgl.remove_layers(model, sgl.layers_to_remove(scores, 2), scores=scores, metric="bi")
    pruned = sgl.wanda_prune(shallow, windows, 0.5, progress=False)
    ev = sgl.token_windows(tokenizer, sgl.load_text("wikipedia", "evaluation"), 32, 3)
    nll = sgl.perplexity(pruned, ev, progress=False, per_window=True)["nll_per_window"]
    stored = r["ppl"].query("variant == 'k=2+wanda@0.5'")["nll"].to_numpy()
    assert stored == pytest.approx(nll, abs=1e-5)
    # int8 counts its float source's parameters; dynamic int8 shrinks the file, weight-only not
    for name in int8 + stacked:
        assert (v.loc[name, ["params_total", "params_nonzero"]]
                == v.loc[v.loc[name, "reference"], ["params_total", "params_nonzero"]]).all()
    assert v.loc[int8[0], "file_bytes"] < v.loc["k=0", "file_bytes"] == v.loc[int8[3], "file_bytes"]
    # the budget: Wanda alone keeps every layer, removal alone removes the most, all ~25%
    removed = 1 - v["params_nonzero"] / v.loc["k=0", "params_total"]
    splits = v.loc[v.index[-3:]]
    assert splits["k"].tolist() == sorted(splits["k"]) and splits["k"].iloc[0] == 0 < k_full
    assert splits["sparsity"].is_monotonic_decreasing
    block = (v.loc["k=0", "params_total"] - v.loc["k=1", "params_total"]) / v.loc["k=0", "params_total"]
    assert (removed[splits.index] - 0.25).abs().max() < block / 2 + 0.01  # whole layers
    # timed together: the unpruned model, the splits, dynamic int8 with and without removal
    timed = ["k=0", *v.index[-3:], int8[0], sgl.combining_variant(k_full, int8="dynamic/tensor")]
    assert r["timings"].groupby("model").size().to_dict() == {m: 2 for m in timed}
    speed = sgl.paired_speedups(r["timings"], "k=0")
    assert list(speed.index) == timed[1:] and (speed["prefill_low"] <= speed["prefill"]).all()
    # the check: a faithful run passes; a moved NLL, other scores and a busy machine fail
    problems = ex.check(r, loaded=tiny)
    assert [p for p in problems if "machine was not idle" not in p] == []
    stale = ex.load_result(r.path)
    stale["ppl"].loc[stale["ppl"]["variant"] == "k=0", "nll"] += 0.01
    stale["ppl"].loc[stale["ppl"]["variant"] == int8[0], "nll"] *= 1.5  # other CPUs: within 10%
    assert {p.split(":")[0] for p in ex.check(stale, loaded=tiny) if "window NLL moved" in p} \
        == {"k=0", "k=0+int8"}
    stale = ex.load_result(r.path)
    stale["scores"]["bi"] = -stale["scores"]["bi"]
    assert any("layers of lowest Block Influence are now" in p for p in ex.check(stale, loaded=tiny))
    stale = ex.load_result(r.path)
    stale["timings"].loc[stale["timings"]["model"] == sgl.budget_variant(0.0),
                         "prefill_seconds"] *= 3
    assert any("has the unpruned model's compute" in p for p in ex.check(stale, loaded=tiny))


def test_combining_quantizes_a_cpu_fp32_copy_of_a_model_elsewhere(tiny, isolated):
    model, tokenizer = tiny
    half = (model.to(torch.bfloat16), tokenizer)
    r = ex.run("combining", "tiny", out=isolated / "stored", loaded=half, progress=False,
               **{**COMBINING, "ks": [0, 1], "sparsities": [0.0], "int8": ["dynamic/tensor"],
                  "stacked": ["dynamic/tensor"], "depth_shares": [0.0]})
    v = r["variants"].set_index("variant")
    assert v.loc["k=1+int8:dynamic/tensor", "reference"] == "k=1@cpu-fp32"
    assert {"k=0@cpu-fp32", "k=1@cpu-fp32"} <= set(v.index)
    assert set(r["timings"]["model"]) == {"k=0", sgl.budget_variant(0.0)}  # one device each


def test_combining_refuses_what_it_cannot_run(tiny, isolated):
    for bad, match in (({"ks": [0, 5]}, "lower ks"), ({"int8": ["int4/tensor"]}, "int8 kinds"),
                       ({"depth_shares": [1.5]}, "depth_shares"), ({"sparsities": [1.0]}, "sparsities"),
                       ({"budget": 0.0}, "budget")):
        with pytest.raises(ValueError, match=match):
            ex.run("combining", "tiny", out=isolated, loaded=tiny, **{**COMBINING, **bad})
