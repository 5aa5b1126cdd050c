"""The shortgpt-lite command line."""

import json

import pytest
import torch
import transformers as T

from shortgpt_lite.cli import main


def test_unknown_metric_and_missing_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["score", "--metric", "cosine"])
    assert err.value.code == 2
    assert "invalid choice: 'cosine'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["prune", "--remove", "3"])
    assert err.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_prune_refuses_a_non_empty_out_folder(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["prune", "--remove", "2", "--out", str(tmp_path)])


def test_too_few_tokens_for_one_window():
    with pytest.raises(SystemExit, match="--tokens \\(100\\) must be at least --seq-len \\(512\\)"):
        main(["score", "--tokens", "100"])


@pytest.mark.slow
def test_score_prints_a_table_and_writes_json(smollm2, tmp_path, capsys):
    from shortgpt_lite import block_influence, load_text, token_windows

    out = tmp_path / "bi.json"
    main(["score", "--model", "smollm2-135m", "--corpus", "wikipedia", "--tokens", "512",
          "--seq-len", "128", "--device", "cpu", "--json", str(out), "--no-progress"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["layer", "bi", "removal", "order"]
    assert len(printed) >= 31 and printed[30].split()[0] == "29"
    record = json.loads(out.read_text())
    assert record["tokens"] == 512 and len(record["scores"]) == 30
    assert sorted(record["removal_order"]) == list(range(1, 31))

    model, tokenizer = smollm2
    windows = token_windows(tokenizer, load_text("wikipedia"), seq_len=128, max_windows=4)
    expected = block_influence(model, windows, progress=False)
    torch.testing.assert_close(torch.tensor(record["scores"]), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_prune_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "pruned"
    main(["prune", "--model", "smollm2-135m", "--tokens", "512", "--seq-len", "128",
          "--remove", "8", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert "22 layers left" in capsys.readouterr().out
    model = T.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 22 and len(model.model.layers) == 22
    record = model.config.shortgpt_lite
    assert len(record["removed_layers"]) == 8 and record["steps"][0]["metric"] == "bi"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_heal_needs_exactly_one_budget(tmp_path):
    with pytest.raises(SystemExit, match="one budget"):
        main(["heal", "--model", "smollm2-135m", "--out", str(tmp_path / "healed")])
    with pytest.raises(SystemExit, match="one budget"):
        main(["heal", "--model", "smollm2-135m", "--steps", "2", "--minutes", "1",
              "--out", str(tmp_path / "healed")])


@pytest.mark.slow
def test_heal_writes_a_healed_model_that_reloads_with_its_record(tmp_path, capsys):
    pruned, healed = tmp_path / "pruned", tmp_path / "healed"
    main(["prune", "--model", "smollm2-135m", "--tokens", "512", "--seq-len", "128",
          "--remove", "8", "--device", "cpu", "--out", str(pruned), "--no-progress"])
    with pytest.raises(SystemExit, match="another tokenizer"):
        main(["heal", "--model", str(pruned), "--teacher", "gemma3-270m", "--method", "bridge",
              "--steps", "2", "--device", "cpu", "--out", str(healed)])
    main(["heal", "--model", str(pruned), "--teacher", "smollm2-135m", "--method", "bridge",
          "--steps", "2", "--tokens", "1024", "--seq-len", "128", "--eval-tokens", "256",
          "--device", "cpu", "--out", str(healed), "--no-progress"])
    out = capsys.readouterr().out
    assert "healed" in out and "2 steps" in out and "held-out wikipedia perplexity" in out
    model = T.AutoModelForCausalLM.from_pretrained(healed)
    assert model.config.num_hidden_layers == 22
    record = model.config.shortgpt_lite_healing
    assert record["method"] == "bridge" and record["steps"] == 2
    assert record["teacher"] == "smollm2-135m" and record["tokens"] == 2 * 4 * 128
    assert len(model.config.shortgpt_lite["removed_layers"]) == 8
