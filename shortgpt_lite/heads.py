"""Attention heads: what each one writes into the residual stream, and removing the quietest.

Structured width pruning removes whole attention heads as well as whole MLP neurons
(LLM-Pruner, Ma et al. 2023, arXiv 2305.11627, prunes heads with their coupled weights;
Michel et al. 2019, arXiv 1905.10650, found many heads removable after training). Query
head :math:`h` of a block, with attention output :math:`z_{h,t} \\in \\mathbb{R}^{d}` at
token :math:`t`, adds :math:`W_O^{(h)} z_{h,t}` to the residual stream, where
:math:`W_O^{(h)}` is its :math:`d` columns of the output projection. Its importance here is
the mean norm of that write over the calibration tokens,

.. math:: I_h = \\frac{1}{T} \\sum_t \\bigl\\lVert W_O^{(h)} z_{h,t} \\bigr\\rVert_2 ,

an activation statistic like Mini-GPT's mean neuron activation, read at the head.

Removing a query head deletes its :math:`d` rows of :math:`W_Q` and its :math:`d` columns
of :math:`W_O`. With grouped-query attention each key/value head serves a group of query
heads; removing the same number from every group keeps the grouping
(``num_key_value_groups``) valid, and removing the same number from every block lets the
config state the new count, so plain transformers saves and reloads the model. Without
grouping (one query head per key/value head) a head's rows of :math:`W_K` and :math:`W_V`
go with it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import decoder_layers, sliced_linear, text_config, unwrap_model
from .records import HEADS_RECORD

__all__ = ["head_importance", "head_params", "heads_for_share", "remove_heads"]


def _attention(block: nn.Module) -> nn.Module:
    attn = getattr(block, "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise LookupError("Removing attention heads needs blocks with a self_attn module holding "
                          "q_proj, k_proj, v_proj and o_proj, as in Llama-family models.")
    return attn


def _shape(model: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head dim)`` of every block, from the modules."""
    attn = _attention(decoder_layers(model)[0])
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d, d


@torch.no_grad()
def head_importance(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                    progress: bool = True) -> torch.Tensor:
    """:math:`I_h`, the mean norm of what each query head writes into the residual stream,
    over every token of ``windows``: a ``[blocks, query heads]`` tensor."""
    blocks = decoder_layers(model)
    heads, _, d = _shape(model)
    sums = torch.zeros(len(blocks), heads, dtype=torch.float64)
    hooks = []

    def record(b):
        def hook(module, args):
            z = args[0].float().reshape(-1, heads, d)              # [tokens, heads, d]
            w = module.weight.float().reshape(-1, heads, d)        # [hidden, heads, d]
            # ||W_O^(h) z_h|| summed over tokens, one [tokens, hidden] product at a time
            sums[b] += torch.stack([(z[:, h] @ w[:, h].T).norm(dim=-1).sum()
                                    for h in range(heads)]).double().cpu()
        return hook

    for b, block in enumerate(blocks):
        hooks.append(_attention(block).o_proj.register_forward_pre_hook(record(b)))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="head importance",
                          disable=not progress):
            model(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return (sums / windows.numel()).float()


def head_params(model: nn.Module) -> int:
    """Parameters that removing one query head from every block deletes: its rows of
    ``q_proj`` and columns of ``o_proj`` (and, without grouping, its ``k_proj`` and
    ``v_proj`` rows), biases included."""
    attn = _attention(decoder_layers(model)[0])
    heads, kv, d = _shape(model)
    hidden = attn.o_proj.out_features
    per_head = 2 * hidden * d + (d if attn.q_proj.bias is not None else 0)
    if heads == kv:
        per_head += 2 * hidden * d + (2 * d if attn.k_proj.bias is not None else 0)
    return per_head * len(decoder_layers(model))


def heads_for_share(model: nn.Module, share: float) -> int:
    """Query heads to remove from every block to take about ``share`` of its heads, in
    whole heads per key/value group, keeping at least one head in every group."""
    heads, kv, _ = _shape(model)
    group = heads // kv
    if group == 1:
        return min(heads - 1, max(0, round(share * heads)))
    return kv * min(group - 1, max(0, round(share * group)))


@torch.no_grad()
def remove_heads(model: nn.Module, n_heads: int, importance: torch.Tensor, *,
                 inplace: bool = False) -> nn.Module:
    """Remove ``n_heads`` query heads from every block, those of least ``importance``
    (:func:`head_importance`), the same number from every key/value group
    (:func:`heads_for_share` gives a valid count). Returns the pruned model (a deep copy
    unless ``inplace=True``); the removed heads are recorded in
    ``config.shortgpt_lite_heads``."""
    heads, kv, d = _shape(model)
    group = heads // kv
    grouped = group > 1
    per_group = n_heads // kv if grouped else n_heads
    if n_heads < 0 or (grouped and (n_heads % kv or per_group >= group)) or n_heads >= heads:
        raise ValueError(f"Cannot remove {n_heads} of {heads} query heads in {kv} key/value "
                         f"groups: remove a multiple of {kv if grouped else 1}, leaving every "
                         "group a head (heads_for_share gives a valid count).")
    if importance.shape != (len(decoder_layers(model)), heads):
        raise ValueError(f"importance has shape {tuple(importance.shape)}; expected one score "
                         "per block and query head, as head_importance returns.")
    if not inplace:
        model = copy.deepcopy(model)
    removed = []
    for b, block in enumerate(decoder_layers(model)):
        attn = _attention(block)
        scores = importance[b].reshape(kv, group) if grouped else importance[b].reshape(1, heads)
        first = torch.arange(scores.shape[0]).unsqueeze(1) * scores.shape[1]  # each group's first head
        dropped = sorted((torch.argsort(scores, dim=1, stable=True)[:, :per_group] + first).flatten().tolist())
        keep_heads = torch.tensor([h for h in range(heads) if h not in dropped])
        keep = (keep_heads.unsqueeze(1) * d + torch.arange(d)).flatten()
        attn.q_proj = sliced_linear(attn.q_proj, keep, 0)
        attn.o_proj = sliced_linear(attn.o_proj, keep, 1)
        if not grouped:
            attn.k_proj = sliced_linear(attn.k_proj, keep, 0)
            attn.v_proj = sliced_linear(attn.v_proj, keep, 0)
        attn.num_key_value_groups = group - per_group if grouped else 1
        removed.append(dropped)
    config = text_config(model)
    config.head_dim = d
    config.num_attention_heads = heads - n_heads
    if not grouped:
        config.num_key_value_heads = heads - n_heads
    setattr(unwrap_model(model).config, HEADS_RECORD, {
        "query_heads_removed": removed, "rule": "least mean norm of the head's write",
        "heads_before": heads})
    return model
