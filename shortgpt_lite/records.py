"""How a model was pruned, written into its config so that a saved model documents itself.

Each kind of pruning keeps its own entry in the model's (top-level) config; they are
saved by ``save_pretrained`` with ``config.json`` and read back by plain
``AutoConfig.from_pretrained``, without this library:

* ``config.shortgpt_lite``: removed layers, in the original numbering, with the metric
  and scores of every removal step (:func:`shortgpt_lite.removal.remove_layers`);
* ``config.shortgpt_lite_sparsity``: Wanda or magnitude sparsity and its settings
  (:mod:`shortgpt_lite.wanda`);
* ``config.shortgpt_lite_context``: the neurons and tokens context pruning removed
  (:mod:`shortgpt_lite.context`);
* ``config.shortgpt_lite_heads``: the attention heads width pruning removed
  (:mod:`shortgpt_lite.heads`).

Healing is not pruning, but a healed model documents it the same way, in
``config.shortgpt_lite_healing`` (:mod:`shortgpt_lite.healing`).
"""

from __future__ import annotations

from torch import nn

from .layers import unwrap_model

__all__ = ["CONTEXT_RECORD", "HEADS_RECORD", "HEALING_RECORD", "REMOVAL_RECORD", "SPARSITY_RECORD",
           "pruning_records"]

REMOVAL_RECORD = "shortgpt_lite"
SPARSITY_RECORD = "shortgpt_lite_sparsity"
CONTEXT_RECORD = "shortgpt_lite_context"
HEADS_RECORD = "shortgpt_lite_heads"
HEALING_RECORD = "shortgpt_lite_healing"


def pruning_records(model: nn.Module) -> dict[str, dict]:
    """Every pruning record in ``model``'s config, keyed by its config attribute; empty
    for a model this library has not pruned."""
    config = unwrap_model(model).config
    return {key: dict(getattr(config, key)) for key in (REMOVAL_RECORD, SPARSITY_RECORD,
                                                         CONTEXT_RECORD, HEADS_RECORD)
            if getattr(config, key, None)}
