"""What goes into a model's forward pass: batches of token ids, the device they go to,
and the keyword arguments a Hugging Face causal LM expects.

Every module that runs a model takes its inputs from here, so a batch is checked, placed
and padded the same way everywhere:

* :func:`iter_batches` turns calibration data of any of four shapes into
  ``(input_ids, attention_mask)`` pairs;
* :func:`input_device` is where token ids must go (the embedding's device, which is
  not the model's device when accelerate splits it over several);
* :func:`model_inputs` builds the keyword arguments of one batch, with position ids
  that ignore left padding;
* :func:`check_token_ids` refuses ids the embedding has no row for before the model
  runs, so the error says what went wrong instead of failing inside the embedding;
* :func:`cache_keyword`, :func:`vocab_rows` and :func:`max_positions` read what the
  loops over a model need to know about it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .layers import text_config, unwrap_model

__all__ = [
    "cache_keyword",
    "check_token_ids",
    "count_batches",
    "input_device",
    "iter_batches",
    "max_positions",
    "model_inputs",
    "vocab_rows",
]


# ----------------------------------------------------------------------------- batches


def _check_batch(ids, mask):
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError("Each batch needs input_ids as an integer tensor [batch, seq_len]; got "
                         f"{type(ids).__name__} {getattr(ids, 'shape', '')}.")
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(ids.shape)}, "
                         f"got {getattr(mask, 'shape', type(mask).__name__)}.")
    return ids, mask.bool()


def _split(ids, mask, batch_size):
    for s in range(0, ids.shape[0], batch_size):
        yield ids[s:s + batch_size], mask[s:s + batch_size]


def iter_batches(data, batch_size: int = 8):
    """Yield ``(input_ids, attention_mask)`` pairs from calibration data.

    ``data`` is a LongTensor of token windows ``[n, seq_len]`` (cut into batches of
    ``batch_size``, no padding), a tokenizer's output with ``input_ids`` and
    ``attention_mask`` (also cut into batches), or an iterable of batches, each a
    mapping with ``input_ids`` and an optional ``attention_mask``, an
    ``(input_ids, attention_mask)`` pair, or a bare ``input_ids`` tensor. Batches from an
    iterable are used as they come and ``batch_size`` is ignored.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, torch.Tensor):
        ids, mask = _check_batch(data, None)
        yield from _split(ids, mask, batch_size)
        return
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise ValueError("A mapping passed as data needs an 'input_ids' entry.")
        ids, mask = _check_batch(data["input_ids"], data.get("attention_mask"))
        yield from _split(ids, mask, batch_size)
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise ValueError("data must be a LongTensor of token windows [n, seq_len] or an iterable "
                         f"of batches; got {type(data).__name__}.")
    for batch in data:
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError("Each batch mapping needs an 'input_ids' entry.")
            yield _check_batch(batch["input_ids"], batch.get("attention_mask"))
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield _check_batch(*batch)
        else:
            yield _check_batch(batch, None)


def count_batches(data, batch_size: int) -> int | None:
    """How many batches :func:`iter_batches` will yield, or None when ``data`` is an
    iterable without a length (a progress bar then shows a count without a total)."""
    if isinstance(data, torch.Tensor):
        return math.ceil(data.shape[0] / batch_size) if data.dim() == 2 else None
    if isinstance(data, Mapping) and "input_ids" in data:
        return math.ceil(len(data["input_ids"]) / batch_size)
    try:
        return len(data)
    except TypeError:
        return None


# ------------------------------------------------------------------------------- model


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids must go: the device of its input embedding."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def vocab_rows(model: nn.Module) -> int:
    """Rows of the input embedding: every token id must be below this."""
    return model.get_input_embeddings().num_embeddings


def max_positions(model: nn.Module) -> int | None:
    """``max_position_embeddings`` of the model's text config, or None if it has none."""
    return getattr(text_config(model), "max_position_embeddings", None)


def check_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    """Raise a ``ValueError`` if ``ids`` hold a token id the model's embedding has no row
    for: the mark of token windows cut with another model's tokenizer."""
    rows = vocab_rows(model)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise ValueError(f"The token ids run from {int(ids.min())} to {int(ids.max())}, outside "
                         f"[0, {rows}): they were cut with another model's tokenizer. Use the "
                         "tokenizer that load_model returned with this model.")


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache and its output returns it.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name;
    earlier versions know only ``past_key_values``. Decoding loops pass and read the cache
    as ``model(token, **{name: cache})`` and ``out[name]``, which works on both.
    """
    forward = unwrap_model(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def model_inputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Keyword arguments for ``model(**…)`` on one batch, on the model's input device.

    With padding, positions are counted over real tokens only (``cumsum(mask) - 1``), so
    a left-padded sequence gets the same positions, and the same hidden states, as the
    unpadded one.
    """
    device = input_device(model)
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device, torch.long),
              "use_cache": False}
    if not bool(mask.all()):
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_(min=0).to(device)
    return kwargs
