"""Remove decoder layers and keep the model a plain, loadable transformers model.

Deleting blocks from ``model.layers`` is one line; the bookkeeping around it is what
breaks in practice:

* Every attention module carries a ``layer_idx``: its slot in the KV cache. After a
  deletion the survivors must be renumbered 0 … L-k-1, or generation with a cache
  reads and writes the wrong slots (or runs past the end of the cache).
* ``config.num_hidden_layers`` must shrink, and every per-layer list in the config with
  it (Gemma-2/3's and Qwen's ``layer_types``, which say which layers use sliding-window
  attention), or the saved model does not load, or loads with the wrong attention.
* The config records which layers were removed, by which metric and with which
  scores, so a saved model documents itself (``config.shortgpt_lite``).

The result saves with ``save_pretrained`` and reloads with plain
``AutoModelForCausalLM.from_pretrained``, no import of this library needed.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import nn

from .layers import decoder_layers, decoder_layers_path, unwrap_model
from .records import REMOVAL_RECORD

__all__ = ["check_layers", "prune_config", "remove_layers"]

# Config lists whose length may equal the number of layers without being per-layer.
_NOT_PER_LAYER = {"architectures"}
# Config lists that hold layer *indices* (renumbered, not sliced).
_INDEX_LISTS = ("mlp_only_layers",)
# Config integers that mark a layer boundary: "layers below this index ...".
_BOUNDARIES = ("max_window_layers",)


def check_layers(layers, n: int) -> list[int]:
    """``layers`` as sorted, distinct indices of a model of ``n`` layers that leave at least
    one, or ``ValueError`` saying what is wrong."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of layer indices, got {layers!r}.")
    if isinstance(layers, torch.Tensor):
        layers = layers.flatten().tolist()
    picked = []
    for entry in layers:
        if isinstance(entry, (bool, float)):
            raise ValueError(
                f"Layer indices must be integers; got {entry!r} ({type(entry).__name__}).")
        try:
            index = operator.index(entry)
        except TypeError:
            raise ValueError(f"Layer indices must be integers; got {entry!r} "
                             f"({type(entry).__name__}).") from None
        if index < 0:
            raise ValueError(f"Layer index {index} is negative; layers are numbered 0 to {n - 1} "
                             "(write the last layer as n-1, not -1).")
        if index >= n:
            raise ValueError(f"Layer index {index} is out of range: the model has {n} layers, "
                             f"numbered 0 to {n - 1}.")
        if index in picked:
            raise ValueError(f"Layer {index} is listed more than once; list each layer to "
                             "remove once.")
        picked.append(index)
    if len(picked) >= n:
        raise ValueError(f"Cannot remove all {n} layers: at least one must stay.")
    return sorted(picked)


def _check_supported(config) -> None:
    # GPT-2's optional 1/(layer_idx+1) attention scaling is fixed when a layer is built
    # and would change on reload under a new index, so a pruned copy could not match.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("This model scales attention by 1/(layer_idx + 1) "
                         "(config.scale_attn_by_inverse_layer_idx=True), so a layer computes "
                         "something different at a new index; removing layers from it is not "
                         "supported.")


def _new_indices(removed: list[int], n: int) -> dict[int, int]:
    """Old index -> new index of every layer that stays."""
    return {old: new for new, old in enumerate(i for i in range(n) if i not in removed)}


def _update_config(config, removed: list[int], n: int) -> None:
    new_index = _new_indices(removed, n)
    kept = list(new_index)
    for name, value in list(vars(config).items()):
        if name in _NOT_PER_LAYER or name.startswith("_"):
            continue
        if name in _INDEX_LISTS and isinstance(value, (list, tuple)):
            setattr(config, name, type(value)(new_index[i] for i in value if i in new_index))
        elif isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, name, type(value)(value[i] for i in kept))
    for name in _BOUNDARIES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, sum(1 for i in kept if i < value))
    config.num_hidden_layers = len(kept)


def _record(config, removed: list[int], n: int, scores, metric) -> None:
    """Write what was removed, in the original model's numbering, into the config."""
    previous = getattr(config, REMOVAL_RECORD, None) or {}
    original_n = previous.get("original_num_hidden_layers", n)
    already = previous.get("removed_layers", [])
    survivors = [i for i in range(original_n) if i not in already]  # current -> original
    step = {"removed": removed, "num_hidden_layers_before": n, "metric": metric,
            "scores": None if scores is None else [float(s) for s in scores]}
    setattr(config, REMOVAL_RECORD, {
        "original_num_hidden_layers": original_n,
        "removed_layers": sorted(already + [survivors[i] for i in removed]),
        "steps": previous.get("steps", []) + [step],
    })


def _check_plan(config, layers, n: int, scores) -> tuple[list[int], list[float] | None]:
    """The sorted layers to remove and the scores as floats, or ``ValueError``."""
    removed = check_layers(layers, n)
    if scores is not None:
        scores = torch.as_tensor(scores).flatten().tolist()
        if len(scores) != n:
            raise ValueError(f"scores has {len(scores)} entries but the model has {n} layers; "
                             "pass the per-layer scores the plan was made from.")
    _check_supported(config.get_text_config())
    return removed, scores


def prune_config(config, layers, n: int, *, scores=None, metric: str | None = None) -> dict:
    """Update ``config`` (of a model with ``n`` decoder layers) as :func:`remove_layers`
    does for removing ``layers``: ``num_hidden_layers``, the per-layer lists and the
    pruning record. Returns ``{old index: new index}`` of the layers that stay. For code
    that rewrites the weights itself (:func:`shortgpt_lite.checkpoint.prune_checkpoint`)."""
    removed, scores = _check_plan(config, layers, n, scores)
    _update_config(config.get_text_config(), removed, n)
    _record(config, removed, n, scores, metric)
    return _new_indices(removed, n)


def remove_layers(model: nn.Module, layers, *, inplace: bool = False, scores=None,
                  metric: str | None = None) -> nn.Module:
    """Delete decoder blocks ``layers`` (0-based indices) and return the shorter model.

    Renumbers every ``layer_idx`` so that generation with a KV cache works, shrinks
    ``config.num_hidden_layers`` and every per-layer config list (``layer_types``), and
    stores ``{"removed_layers", "original_num_hidden_layers", "steps"}`` under
    ``config.shortgpt_lite``, where each step keeps the ``metric`` and per-layer
    ``scores`` that chose it. Removing layers twice records both steps, with
    ``removed_layers`` always in the original model's numbering.

    The input model is left untouched (a deep copy is pruned) unless ``inplace=True``.
    ``ValueError`` for an index out of range, a negative, duplicate or non-integer
    index, or a plan that removes every layer.
    """
    blocks = decoder_layers(model)
    n = len(blocks)
    inner = unwrap_model(model)
    removed, scores = _check_plan(inner.config, layers, n, scores)

    if not inplace:
        model = copy.deepcopy(model)
        inner = unwrap_model(model)
        blocks = decoder_layers(model)

    for i in reversed(removed):
        del blocks[i]  # ModuleList renumbers its children, so state-dict keys stay contiguous
    for new, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new

    _update_config(inner.config.get_text_config(), removed, n)
    _record(inner.config, removed, n, scores, metric)
    _update_device_map(inner, removed, n)
    return model


def _update_device_map(inner: nn.Module, removed: list[int], n: int) -> None:
    """Keep accelerate's ``hf_device_map`` naming the blocks by their new indices."""
    device_map = getattr(inner, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    prefix = decoder_layers_path(inner) + "."
    new_index = _new_indices(removed, n)
    updated = {}
    for name, device in device_map.items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                if int(index) not in new_index:
                    continue
                name = prefix + str(new_index[int(index)]) + ("." + rest if rest else "")
        updated[name] = device
    inner.hf_device_map = updated
