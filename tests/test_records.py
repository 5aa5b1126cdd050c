"""Each kind of pruning writes its own record into the config, and they stay apart."""

import torch

from shortgpt_lite import pruning_records, remove_layers, wanda_prune
from shortgpt_lite.records import REMOVAL_RECORD, SPARSITY_RECORD
from tiny import random_windows, tiny_model


def test_records_of_removal_and_wanda_sit_side_by_side(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    assert pruning_records(model) == {}
    pruned = remove_layers(model, [1])
    pruned = wanda_prune(pruned, random_windows(), 0.5, inplace=True, progress=False)
    records = pruning_records(pruned)
    assert set(records) == {REMOVAL_RECORD, SPARSITY_RECORD}
    assert records[REMOVAL_RECORD]["removed_layers"] == [1]
    assert records[SPARSITY_RECORD]["method"] == "wanda"
    pruned.save_pretrained(tmp_path)
    assert pruning_records(AutoModelForCausalLM.from_pretrained(tmp_path)) == records
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight,
                       tiny_model("llama").model.layers[1].mlp.up_proj.weight)
