"""Layer importance: one score per decoder layer, lower = remove first.

ShortGPT ranks layers by Block Influence; the papers it is compared with rank them other
ways. All of them are here behind one function, :func:`layer_importance`, so a chapter can
swap the metric and keep everything else:

* ``bi``: Block Influence ``1 - E_t[cos(x_i, x_{i+1})]`` (Men et al. 2024).
* ``angular``: angular distance ``E[arccos(cos(x_i, x_{i+1}))/π]`` of one layer (n = 1),
  over each sequence's last token by default (Gromov et al. 2024).
* ``relative_magnitude``: ``E_t[‖f(x)‖ / ‖x + f(x)‖]`` (Samragh et al. 2023).
* ``sequential``: ``i``, so layers go from the front, layer 0 first.
* ``reverse``: ``L-1-i``, so layers go from the back, the last layer first.
* ``random``: a seeded random permutation.
* ``ppl``: perplexity on the data with layer ``i`` alone skipped (Kim et al. 2024,
  "Shortened LLaMA", arXiv 2402.02834, the PPL criterion).
* ``taylor``: first-order Taylor importance of the block's weights,
  ``Σ_k Σ_j |W^k_j · ∂L/∂W^k_j|`` (Shortened LLaMA, the Taylor criterion).

:func:`layers_to_remove` turns scores into a plan: the ``k`` lowest-scoring layers,
optionally never touching the first or last few, which is what Shortened LLaMA's
"Taylor+" adds to the Taylor score.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import token_nll
from .hooks import layer_statistics, resolve_model
from .inputs import iter_batches, model_inputs
from .layers import decoder_layers, replaced_forward
from .prefix import SharedPrefix

__all__ = ["METRICS", "layer_importance", "layers_to_remove", "skip_layer"]

METRICS = {
    "bi": "Block Influence 1 - E[cos(x_i, x_i+1)] (ShortGPT)",
    "angular": "angular distance arccos(cos(x_i, x_i+1))/pi, n = 1 (Gromov et al.)",
    "relative_magnitude": "||f(x)|| / ||x + f(x)|| (Samragh et al.)",
    "sequential": "layer index: remove front to back",
    "reverse": "reversed layer index: remove back to front",
    "random": "seeded random permutation",
    "ppl": "perplexity with the layer skipped (Shortened LLaMA)",
    "taylor": "first-order Taylor importance sum |w * dL/dw| of the block (Shortened LLaMA)",
}

# Above this many bytes of recorded hidden states, the ppl metric runs every skip in full.
_PREFIX_BYTES = 4 * 2**30

_NEEDS_DATA = {"bi", "angular", "relative_magnitude", "ppl", "taylor"}


def layer_importance(model, data=None, metric: str = "bi", *, batch_size: int = 8,
                     progress: bool = True, seed: int = 0, tokens: str = "last",
                     share_prefix: bool = True, stream: bool = False,
                     resume_dir=None, distributed: bool = False, device="auto",
                     dtype=None) -> torch.Tensor:
    """One fp32 score per decoder layer (``Tensor[L]`` on the CPU); lower = remove first.

    ``metric`` is one of :data:`METRICS`. ``data`` (token windows or batches, see
    :func:`shortgpt_lite.inputs.iter_batches`) is needed by every metric except
    ``sequential``, ``reverse`` and ``random``. ``seed`` drives ``random``; ``tokens``
    (``"last"`` or ``"all"``) picks the tokens ``angular`` averages over.
    ``share_prefix=False`` makes ``ppl`` run the whole model for every skipped layer
    instead of starting from the recorded state before it (the same scores, slower).

    Cost: ``bi``, ``angular`` and ``relative_magnitude`` take one forward pass that stops
    after the last layer; ``ppl`` takes L full forward passes; ``taylor`` one forward and
    backward pass per batch.

    ``model`` may also be a model folder, hub id or bundled name (loaded on ``device`` in
    ``dtype``). ``stream=True`` scores it
    one block at a time without loading it whole (``resume_dir`` keeps the state after
    each block): see :mod:`shortgpt_lite.stream`. ``ppl`` and ``taylor`` cannot stream.
    ``distributed=True`` all-reduces the one-pass metrics over the ranks of a ``torchrun``,
    each rank holding its own share of the data (:func:`layer_statistics`).
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}. Choose one of: {', '.join(METRICS)}.")
    if stream:
        from .checkpoint import empty_model, model_folder
        from .stream import check_streamable

        check_streamable(metric)
        n = len(decoder_layers(empty_model(model_folder(resolve_model(model, stream)))))
    else:
        model = resolve_model(model, stream, device, dtype)
        n = len(decoder_layers(model))
    if metric in _NEEDS_DATA and data is None:
        raise ValueError(f"The {metric!r} metric needs calibration data: pass token windows "
                         "from token_windows(...) as data.")
    if distributed and metric in ("ppl", "taylor"):
        raise ValueError(f"The {metric!r} metric is not computed data-parallel; run it in one "
                         "process, or use bi, angular or relative_magnitude.")
    stats = dict(batch_size=batch_size, progress=progress, stream=stream, resume_dir=resume_dir,
                 distributed=distributed, device=device, dtype=dtype)
    if metric == "bi":
        return layer_statistics(model, data, **stats).block_influence
    if metric == "angular":
        return layer_statistics(model, data, angular=1, pair_tokens=tokens,
                                **stats).angular_distance[0]
    if metric == "relative_magnitude":
        return layer_statistics(model, data, relative_magnitude=True, **stats).relative_magnitude
    if metric == "sequential":
        return torch.arange(n, dtype=torch.float32)
    if metric == "reverse":
        return torch.arange(n - 1, -1, -1, dtype=torch.float32)
    if metric == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=generator).float()
    if metric == "ppl":
        return _perplexity_without_each_layer(model, data, batch_size, progress, share_prefix)
    return _taylor(model, data, batch_size, progress)


def layers_to_remove(scores, k: int, *, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The ``k`` layers with the lowest scores, as a sorted list of indices: the plan
    that :func:`shortgpt_lite.removal.remove_layers` carries out.

    Ties go to the lower index. ``keep_first`` / ``keep_last`` take the first and last
    few layers out of the candidates, the heuristic that turns Shortened LLaMA's Taylor
    score into "Taylor+" (early and final blocks score low but matter).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = scores.numel()
    for name, value in (("k", k), ("keep_first", keep_first), ("keep_last", keep_last)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if torch.isnan(scores).any():
        bad = torch.nonzero(torch.isnan(scores)).flatten().tolist()
        raise ValueError(f"The scores of layers {bad} are NaN; recompute them (in fp32) before "
                         "planning a removal.")
    if k >= n:
        raise ValueError(f"Cannot remove {k} of {n} layers: at least one must stay. "
                         f"Use k from 0 to {n - 1}.")
    candidates = list(range(keep_first, n - keep_last))
    if k > len(candidates):
        raise ValueError(f"Only {len(candidates)} layers are candidates after keep_first="
                         f"{keep_first} and keep_last={keep_last}; cannot remove {k}.")
    order = sorted(candidates, key=lambda i: (scores[i].item(), i))
    return sorted(order[:k])


# ------------------------------------------------------------------------------- ppl


def _masked_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Sum of next-token negative log-likelihoods over real tokens, and their count."""
    valid = (mask[:, :-1] & mask[:, 1:]).to(logits.device)
    nll = token_nll(logits[:, :-1], ids[:, 1:].to(logits.device))
    return torch.where(valid, nll, 0.0).sum(), int(valid.sum())


@contextmanager
def skip_layer(layer: nn.Module, returns_tuple_of: int | None = None):
    """Make ``layer`` return its input unchanged, in the output format of the block
    (a tensor, or a tuple of ``returns_tuple_of`` items as Falcon's blocks return), so a
    forward pass runs as if the layer had been removed. The KV cache of a skipped
    layer stays empty, so use it without a cache."""
    def identity(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if returns_tuple_of is None:
            return hidden
        return (hidden,) + (None,) * (returns_tuple_of - 1)

    with replaced_forward(layer, identity):
        yield layer


def _perplexity_without_each_layer(model, data, batch_size, progress,
                                   share_prefix: bool = True) -> torch.Tensor:
    """``PPL_i = exp( Σ NLL / #tokens )`` on ``data`` with layer ``i`` alone skipped.

    Skipping layer ``i`` leaves layers ``0 .. i-1`` as they were, so one unpruned pass
    records the state entering every layer and each skip starts there
    (:class:`shortgpt_lite.prefix.SharedPrefix`): about ``L/2 + 1`` passes instead of
    ``L``. When those states would take more than ``_PREFIX_BYTES`` (a large model on much
    data), or with ``share_prefix=False``, every skip runs the whole model instead.
    """
    layers = decoder_layers(model)
    batches = list(iter_batches(data, batch_size))
    width = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    states = sum(int(ids.numel()) for ids, _ in batches) * width * (len(layers) - 1) \
        * next(model.parameters()).element_size()
    shared = share_prefix and states <= _PREFIX_BYTES
    prefix = SharedPrefix(model, range(1, len(layers)) if shared else [])
    was_training = model.training
    model.eval()

    def nll_of_data():
        nll, count = 0.0, 0
        for ids, mask in batches:
            logits = model(**model_inputs(model, ids, mask)).logits
            s, c = _masked_nll(logits, ids, mask)
            nll, count = nll + float(s), count + c
            bar.update()
        if count == 0:
            raise ValueError("The data has no pair of consecutive real tokens to score a "
                             "perplexity on.")
        return nll / count

    bar = tqdm(total=(len(layers) + 1) * len(batches), desc="perplexity without each layer",
               unit="batch", disable=not progress)
    scores = []
    try:
        with torch.no_grad():
            with prefix.recording():
                nll_of_data()
            for i in range(len(layers)):
                with prefix.removed([i]):
                    scores.append(math.exp(nll_of_data()))
    finally:
        bar.close()
        model.train(was_training)
    return torch.tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------- taylor


def _taylor(model, data, batch_size, progress) -> torch.Tensor:
    """Block-level first-order Taylor importance (Shortened LLaMA's Taylor criterion):

        I_i = Σ_k Σ_j | W^{k,i}_j · ∂L/∂W^{k,i}_j |

    where ``W^{k,i}`` runs over the weight matrices (parameters with two or more
    dimensions: the attention and MLP projections) of block ``i`` and ``L`` is the
    mean next-token cross-entropy over all real tokens of ``data``. It estimates how
    much the loss changes when the block's weights are set to zero. Gradients are
    accumulated over all batches before the product is taken; the model's own
    ``requires_grad`` flags and ``.grad`` are restored afterwards.
    """
    layers = decoder_layers(model)
    batches = list(iter_batches(data, batch_size))
    total = sum(int((m[:, :-1] & m[:, 1:]).sum()) for _, m in batches)
    if total == 0:
        raise ValueError("The data has no pair of consecutive real tokens to compute a loss on.")
    weights = [[p for p in layer.parameters() if p.dim() >= 2] for layer in layers]
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for group in weights:
            for p in group:
                p.requires_grad_(True)
        with torch.enable_grad():
            for ids, mask in tqdm(batches, desc="Taylor importance", unit="batch",
                                  disable=not progress):
                logits = model(**model_inputs(model, ids, mask)).logits
                nll, _ = _masked_nll(logits, ids, mask)
                (nll / total).backward()
                del logits, nll
        scores = []
        for group in weights:
            s = sum(float((p.detach().float() * p.grad.float()).abs().sum())
                    for p in group if p.grad is not None)
            scores.append(s)
    finally:
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.tensor(scores, dtype=torch.float32)
