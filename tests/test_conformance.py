"""shortgpt-lite check: every check passes on a model pruned by this library, and each
fails on the broken model it is there to catch."""

import json
import sys

import pytest
import torch
from torch import nn

import shortgpt_lite as sgl
from shortgpt_lite import conformance
from shortgpt_lite.cli import main
from tiny import tiny_model


def _saved(tmp_path, arch="gemma3", plan=(1, 4)):
    model = tiny_model(arch, layers=7)
    model.save_pretrained(tmp_path / "original")
    sgl.remove_layers(model, list(plan)).save_pretrained(tmp_path / "pruned")
    return model


def test_a_pruned_gemma3_passes_every_check(tmp_path, capsys):
    _saved(tmp_path)
    for original in (None, tmp_path / "original"):
        table = conformance.check_model(tmp_path / "pruned", original=original)
        assert len(table) == 7
        ran = table[table["passed"].notna()]
        assert ran["passed"].all(), table.to_string()
        assert len(ran) >= 6  # only lm-eval may be skipped
    main(["check", str(tmp_path / "pruned"), "--original", str(tmp_path / "original")])
    assert "every check that could run passed" in capsys.readouterr().out


def test_a_config_that_disagrees_with_the_weights_fails_and_exits_nonzero(tmp_path, capsys):
    _saved(tmp_path, arch="llama")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    config["num_hidden_layers"] = 7  # the blocks were removed, the count was not
    (tmp_path / "pruned" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(tmp_path / "pruned")])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "missing_keys" in out


def test_gemma3_layer_types_left_at_the_old_length_fail(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    config["layer_types"] = config["layer_types"] + ["sliding_attention", "full_attention"]
    (tmp_path / "pruned" / "config.json").write_text(json.dumps(config))
    table = conformance.check_model(tmp_path / "pruned")
    assert not table["passed"].fillna(True).all(), table.to_string()


def test_logits_against_the_original_catch_a_wrong_record(tmp_path):
    _saved(tmp_path, arch="llama")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    config["shortgpt_lite"]["removed_layers"] = [2, 5]  # not the blocks that were removed
    (tmp_path / "pruned" / "config.json").write_text(json.dumps(config))
    table = conformance.check_model(tmp_path / "pruned", original=tmp_path / "original")
    row = table.set_index("check").loc["logits equal those before saving"]
    assert row["passed"] is False or row["passed"] == False  # noqa: E712


def test_blocks_deleted_without_renumbering_fail_the_cache_and_config_checks():
    model = tiny_model("llama", layers=5)
    del model.model.layers[1]  # by hand: layer_idx stays 2, 3, 4 (transformers#30508)
    model.config.num_hidden_layers = 4
    passed, detail = conformance.check_config_lists(model)
    assert passed is False and "layer_idx" in detail
    ok = sgl.remove_layers(tiny_model("llama", layers=5), [1])
    assert conformance.check_config_lists(ok)[0] and conformance.check_kv_cache(ok, 0)[0]


class _IgnoresMask(nn.Module):
    """A model that drops the attention mask and positions: padding leaks in."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_the_padding_check_catches_a_model_that_ignores_the_mask():
    model = tiny_model("llama", layers=2)
    assert conformance.check_padding(model, 0)[0]
    assert conformance.check_padding(_IgnoresMask(model), 0)[0] is False


def test_the_half_precision_check_catches_fp16_overflow():
    model = tiny_model("llama", layers=2)
    assert conformance.check_half_precision(model, 0)[0]
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e6)  # beyond fp16's 65504
    passed, detail = conformance.check_half_precision(model, 0)
    assert passed is False and "float16" in detail


def test_the_lm_eval_check_scores_a_request_or_says_it_is_not_installed(tmp_path, monkeypatch):
    from tiny import byte_tokenizer, tiny_llama

    sgl.remove_layers(tiny_llama(vocab_size=320, layers=4), [1]).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    try:
        import lm_eval  # noqa: F401  (the optional extra)
    except ImportError:
        pass
    else:
        passed, detail = conformance.check_lm_eval(tmp_path, "cpu")
        assert passed is True and "log p" in detail
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as where it is not installed
    monkeypatch.setitem(sys.modules, "lm_eval.api.instance", None)
    passed, detail = conformance.check_lm_eval(tmp_path, "cpu")
    assert passed is None and "not installed" in detail
