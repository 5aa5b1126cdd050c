"""Wanda and magnitude pruning: unstructured and N:M sparsity inside every linear layer.

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
Models", arXiv 2306.11695) scores every weight of a linear layer ``y = W x`` by

.. math:: S_{ij} = |W_{ij}| \\cdot \\lVert X_j \\rVert_2

where :math:`\\lVert X_j \\rVert_2` is the L2 norm of input channel ``j`` over every
calibration token. Weights are compared *within each output row* (the paper's
"comparison group"), so every output neuron keeps the same number of inputs. Magnitude pruning is
the data-free baseline, :math:`S_{ij} = |W_{ij}|`, compared per row or over the whole
layer.

Calibration runs block by block, as in the paper's reference procedure: the inputs of block
``b`` are gathered once, hooks on each of its linear layers sum :math:`X_j^2`, the block
is pruned, and its *pruned* outputs become the inputs of block ``b + 1``. Each block
therefore runs twice over the calibration tokens (statistics, then pruned outputs) and
only one block's activations are alive at a time. Sequences are capped at
``max_seq_len`` tokens; the model's ``max_position_embeddings`` is never used to size
anything (the reference code allocates 128 × max_pos × hidden and runs out of memory on
Llama-3).

Sparsity is a fraction in [0, 1) (the same count of zeros in every row) or ``"N:M"`` in
NVIDIA's and the paper's convention: in every group of M consecutive inputs of a row, N
weights are kept and the M - N lowest-scoring are zeroed (the paper reports 2:4 and 4:8).
Masks are applied as zeros in the weights, so a pruned model is a plain transformers model
that saves and reloads as it is; :func:`sparsity_report` reads the achieved sparsity of
every layer back from the zeros.
"""

from __future__ import annotations

import copy
import math
import re
from contextlib import ExitStack

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import check_windows
from .inputs import input_device
from .layers import decoder_layers, replaced_forward, stop_after, unwrap_model
from .records import SPARSITY_RECORD

__all__ = [
    "sparsity_entry",
    "wanda_prune_block",
    "block_inputs",
    "magnitude_prune",
    "prunable_parameters",
    "run_block",
    "sparsity_mask",
    "sparsity_report",
    "wanda_prune",
    "wanda_scores",
]


# ---------------------------------------------------------------------------- checks


def _parse_sparsity(sparsity) -> tuple[float, tuple[int, int] | None]:
    """``(fraction zeroed, (n, m) or None)`` from a fraction in [0, 1) or an ``"N:M"`` string,
    which keeps N weights of every M."""
    if isinstance(sparsity, (tuple, list)) and len(sparsity) == 2:
        sparsity = f"{sparsity[0]}:{sparsity[1]}"
    if isinstance(sparsity, str):
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", sparsity)
        if not found:
            raise ValueError(f"sparsity {sparsity!r} is not of the form 'N:M' (e.g. '2:4'); pass "
                             "'N:M' or a fraction in [0, 1).")
        n, m = int(found[1]), int(found[2])
        if not 1 <= n < m:
            raise ValueError(f"N:M sparsity needs 1 <= N < M, got {n}:{m}: N weights are kept in "
                             "every group of M and the other M - N zeroed, so N must be at least 1 "
                             "and smaller than M (e.g. '2:4', '4:8').")
        return (m - n) / m, (n, m)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(
            f"sparsity must be a fraction in [0, 1) or 'N:M', got {sparsity!r}.")
    if not (0.0 <= float(sparsity) < 1.0) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}: it is the fraction of "
                         "weights set to zero, and pruning every weight leaves no model.")
    return float(sparsity), None


def _check_per(per) -> None:
    if per not in ("row", "layer"):
        raise ValueError(f"per must be 'row' (compare weights within each output row, as Wanda "
                         f"does) or 'layer' (over the whole matrix), got {per!r}.")


def _check_windows(windows, max_seq_len: int) -> torch.Tensor:
    """Calibration windows as ``[n, seq_len]`` with ``seq_len <= max_seq_len``.

    Longer windows are cut into pieces of ``max_seq_len`` tokens (the tail is dropped):
    Wanda needs token statistics, not long contexts, and memory grows with the length.
    """
    check_windows(windows, "token_windows(tokenizer, load_text('wikipedia'), 512, 64)")
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}.")
    n, seq_len = windows.shape
    if seq_len > max_seq_len:
        pieces = seq_len // max_seq_len
        windows = windows[:, : pieces * max_seq_len].reshape(n * pieces, max_seq_len)
    return windows


def _block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_parameters(model: nn.Module) -> int:
    """Weights of every ``nn.Linear`` inside the decoder blocks: what Wanda and magnitude
    pruning can zero. Embeddings, the LM head, norms and biases are never pruned."""
    return sum(m.weight.numel() for block in decoder_layers(model)
               for m in _block_linears(block).values())


# --------------------------------------------------------------------------- scores


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance :math:`S_{ij} = |W_{ij}| \\cdot \\lVert X_j \\rVert_2` (arXiv 2306.11695).

    ``weight`` is ``[out, in]`` (``nn.Linear`` layout) and ``input_norms`` the ``[in]`` L2
    norms of the input channels over the calibration tokens. Returns fp32 ``[out, in]``.
    """
    if input_norms.dim() != 1 or input_norms.numel() != weight.shape[1]:
        raise ValueError(f"input_norms must have one entry per input channel ({weight.shape[1]}), "
                         f"got shape {tuple(input_norms.shape)}.")
    return weight.detach().float().abs() * input_norms.float().to(weight.device)[None, :]


def sparsity_mask(scores: torch.Tensor, sparsity=0.5, *, per: str = "row") -> torch.Tensor:
    """Which weights to prune (``True`` = set to zero), from ``scores`` ``[out, in]``.

    * a fraction ``s`` with ``per="row"``: in every row, the ``round(s · in)`` lowest
      scores (Wanda's per-output comparison group);
    * ``per="layer"``: the ``round(s · out · in)`` lowest scores of the whole matrix
      (the classic magnitude-pruning comparison group);
    * ``"N:M"``: in every row, the M - N lowest of each group of M consecutive inputs, so
      that N are kept (NVIDIA's and the Wanda paper's convention; ``per`` is ignored).

    Ties go to the lower index, so a mask is the same on every run.
    """
    fraction, nm = _parse_sparsity(sparsity)
    if scores.dim() != 2:
        raise ValueError(f"scores must be a matrix [out, in], got shape {tuple(scores.shape)}.")
    out_f, in_f = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise ValueError(f"N:M sparsity needs the number of inputs ({in_f}) to be a multiple "
                             f"of M={m}; use a fraction instead for this layer.")
        groups = scores.reshape(out_f, in_f // m, m)
        lowest = torch.sort(groups, dim=-1, stable=True).indices[..., :m - n]
        return mask.reshape(out_f, in_f // m, m).scatter_(-1, lowest, True).reshape(out_f, in_f)
    if per == "row":
        k = round(fraction * in_f)
        return _lowest_per_row(scores, k) if k else mask
    if per == "layer":
        k = round(fraction * scores.numel())
        return _lowest_per_row(scores.reshape(1, -1), k).view_as(scores) if k else mask
    raise ValueError(f"per must be 'row' or 'layer', got {per!r}.")


def _lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` lowest entries of every row, ties to the lower index.

    A selection (``kthvalue``) instead of a full sort: about twice as fast on the CPU,
    and the masks of a whole model are most of Wanda's time beyond its forward passes.
    """
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    at_most = scores <= kth  # at least k per row; exactly k unless a row ties at its kth
    if int(at_most.sum()) == k * scores.shape[0]:
        return at_most
    below = scores < kth
    ties = at_most & ~below
    missing = k - below.sum(1, keepdim=True)
    return below | (ties & (ties.cumsum(1) <= missing))


def _apply(linear: nn.Linear, mask: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


def _record(model: nn.Module, **entry) -> None:
    setattr(unwrap_model(model).config, SPARSITY_RECORD, entry)


# ----------------------------------------------------------------------- calibration


def block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int):
    """The inputs of block 0 and the call arguments of every block, per batch.

    Every block's ``forward`` is swapped for a stub that records its arguments (masks,
    rotary embeddings, which differ per block in Gemma-3's alternating attention) and
    passes the hidden states through, so this pass costs only the embedding. Returns
    ``(hidden, calls, tuple_output)``: ``hidden[k]`` is batch ``k``'s input to block 0,
    ``calls[b][k]`` the ``(args, kwargs)`` block ``b`` received after its hidden states,
    and ``tuple_output`` whether a block returns a tuple. :func:`run_block` replays them.
    """
    blocks = decoder_layers(model)
    device = input_device(model)
    hidden: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in blocks]
    tuple_output: list = []

    def stub(b: int, original):
        def forward(*args, **kwargs):
            x = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:]
            if b == 0:
                hidden.append(x)
                if not tuple_output:  # the output format of a block, learned once
                    out = original(x, *rest, **kwargs)
                    tuple_output.append(isinstance(out, (tuple, list)))
            calls[b].append((rest, kwargs))
            return (x,) if tuple_output[0] else x
        return forward

    with ExitStack() as swapped, torch.inference_mode():
        for b, block in enumerate(blocks):
            swapped.enter_context(replaced_forward(block, stub(b, block.forward)))
        for start in range(0, windows.shape[0], batch_size):
            with stop_after(blocks[-1]):
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    return hidden, calls, bool(tuple_output[0])


def run_block(block: nn.Module, hidden, calls, tuple_output: bool) -> list[torch.Tensor]:
    """``block``'s output for every batch of ``hidden``, called with the arguments
    :func:`block_inputs` recorded for it."""
    out = []
    for x, (args, kwargs) in zip(hidden, calls):
        y = block(x, *args, **kwargs)
        out.append(y[0] if isinstance(y, (tuple, list)) else y)  # Falcon returns a tuple
    return out


def _input_norms(block: nn.Module, hidden, calls, tuple_output: bool) -> dict[str, torch.Tensor]:
    """:math:`\\lVert X_j \\rVert_2` for every input channel of every linear in ``block``."""
    linears = _block_linears(block)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
            for name, m in linears.items()}

    def hook(name):
        def collect(module, args):
            x = args[0].detach()
            sums[name] += torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]).float(), dim=0) ** 2
        return collect

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        run_block(block, hidden, calls, tuple_output)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def wanda_prune_block(block: nn.Module, hidden, calls, tuple_output: bool, sparsity=0.5, *,
                      per: str = "row", outputs: bool = True) -> list[torch.Tensor] | None:
    """Wanda on one decoder block, in place: :math:`\\lVert X_j\rVert_2` of every linear's
    inputs over the batches ``hidden`` (called with ``calls``, as :func:`block_inputs`
    records them), :math:`S = |W| \\cdot \\lVert X\rVert_2`, the lowest scores set to zero.
    Returns the pruned block's outputs, the next block's inputs (None with
    ``outputs=False``, for the last block)."""
    norms = _input_norms(block, hidden, calls, tuple_output)
    for name, linear in _block_linears(block).items():
        _apply(linear, sparsity_mask(wanda_scores(linear.weight, norms[name]), sparsity, per=per))
    return run_block(block, hidden, calls, tuple_output) if outputs else None


def sparsity_entry(method: str, sparsity, per: str, windows: torch.Tensor | None = None) -> dict:
    """The record a pruned model's config keeps under ``SPARSITY_RECORD``."""
    fraction, nm = _parse_sparsity(sparsity)
    entry = {"method": method, "sparsity": fraction,
             "structure": None if nm is None else f"{nm[0]}:{nm[1]}", "per": per}
    if windows is not None:
        entry |= {"calibration_tokens": int(windows.numel()),
                  "calibration_seq_len": int(windows.shape[1])}
    return entry


def wanda_prune(model: nn.Module, windows: torch.Tensor, sparsity=0.5, *, per: str = "row",
                batch_size: int = 8, max_seq_len: int = 2048, inplace: bool = False,
                progress: bool = True) -> nn.Module:
    """Prune every linear layer of the decoder blocks with Wanda, block by block.

    ``windows`` is a LongTensor ``[n, seq_len]`` of calibration tokens (the paper uses
    128 sequences of C4; ``token_windows(tokenizer, load_text('wikipedia'), 512, 64)``
    is plenty for a 135M model). ``sparsity`` is a fraction in [0, 1), the share of
    weights zeroed in every output row, or ``"2:4"`` / ``"4:8"`` (N:M). Sequences
    longer than ``max_seq_len`` are cut into pieces of that length. ``per="layer"``
    compares the scores over the whole matrix instead of within each output row. The
    paper ablates this comparison group; with :func:`magnitude_prune` it separates what
    the score buys from what the grouping buys.

    For each block ``b``: :math:`\\lVert X_j\\rVert_2` of every linear's inputs over all
    calibration tokens, :math:`S = |W| \\cdot \\lVert X\\rVert_2` (:func:`wanda_scores`),
    the lowest scores of each row set to zero (:func:`sparsity_mask`), then the pruned
    block is run again and its outputs feed block ``b + 1``.

    Returns the pruned model (a deep copy unless ``inplace=True``); the settings are
    stored in ``config.shortgpt_lite_sparsity`` and :func:`sparsity_report` gives the
    achieved sparsity per layer.
    """
    _parse_sparsity(sparsity)
    _check_per(per)
    windows = _check_windows(windows, max_seq_len)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not inplace:
        model = copy.deepcopy(model)
    blocks = decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        hidden, calls, tuple_output = block_inputs(model, windows, batch_size)
        with torch.inference_mode():
            for b, block in enumerate(tqdm(blocks, desc=f"Wanda {sparsity}",
                                           disable=not progress)):
                # the pruned outputs are the next block's inputs
                hidden = wanda_prune_block(block, hidden, calls[b], tuple_output, sparsity,
                                           per=per, outputs=b < len(blocks) - 1)
    finally:
        model.train(was_training)
    _record(model, **sparsity_entry("wanda", sparsity, per, windows))
    return model


def magnitude_prune(model: nn.Module, sparsity=0.5, *, per: str = "row", inplace: bool = False,
                    progress: bool = True) -> nn.Module:
    """Data-free baseline: zero the weights of smallest :math:`|W_{ij}|` in every linear
    layer of the decoder blocks, per output row (``per="row"``, the comparison group
    Wanda uses) or over the whole layer (``per="layer"``, the "Magnitude" baseline of
    Wanda's tables).
    ``sparsity`` is a fraction in [0, 1) or ``"N:M"``. Returns the pruned model (a deep
    copy unless ``inplace=True``)."""
    _parse_sparsity(sparsity)
    _check_per(per)
    if not inplace:
        model = copy.deepcopy(model)
    for block in tqdm(decoder_layers(model), desc=f"magnitude {sparsity}", disable=not progress):
        for linear in _block_linears(block).values():
            _apply(linear, sparsity_mask(linear.weight.detach().float().abs(), sparsity, per=per))
    _record(model, **sparsity_entry("magnitude", sparsity, per))
    return model


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """The achieved sparsity of every linear layer in the decoder blocks, read from the
    zeros in the weights. Columns: ``layer`` (block index), ``module`` (e.g.
    ``"mlp.down_proj"``), ``params``, ``zeros``, ``sparsity``."""
    rows = []
    for b, block in enumerate(decoder_layers(model)):
        for name, linear in _block_linears(block).items():
            zeros = int((linear.weight == 0).sum())
            rows.append({"layer": b, "module": name, "params": linear.weight.numel(),
                         "zeros": zeros, "sparsity": zeros / linear.weight.numel()})
    return pd.DataFrame(rows, columns=["layer", "module", "params", "zeros", "sparsity"])
