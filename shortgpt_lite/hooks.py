"""The one hooked pass: statistics of the residual stream, every layer, one forward.

Write ``x_i`` for the hidden state entering decoder layer ``i`` and ``x_{i+1}`` for the
state leaving it (``i = 0 … L-1``; ``x_0`` is the embedding output), and
``f_i(x) = x_{i+1} - x_i`` for what the layer adds. Averaged over every non-padding token
``t`` of every calibration sequence ``X``:

* Block Influence (Men et al. 2024, "ShortGPT", arXiv 2403.03853, its method section):
  ``BI_i = 1 - E_{X,t}[ cos(x_{i,t}, x_{i+1,t}) ]``. A layer that barely turns the
  residual stream has a low BI and is deleted first.
* relative magnitude (Samragh et al. 2023, "Weight subcloning", arXiv 2312.09299):
  ``E_t[ ‖f_i(x)‖ / ‖x + f_i(x)‖ ]``;
* layer similarity ``S[i, j] = E_t[ cos(x_i, x_j) ]`` for every pair of states, the
  (L+1)×(L+1) matrix behind the layer-similarity heatmaps (``1 - S[i, i+1] = BI_i``);
* angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", arXiv 2403.17887) of a block of ``n`` layers:
  ``d(x_ℓ, x_{ℓ+n}) = E[ arccos(cos(x_ℓ, x_{ℓ+n})) / π ]``. Gromov et al. use the last
  token of each sequence (``pair_tokens="last"``); ``"all"`` averages over every token.

The module reads in that order: one kernel per statistic (the formula at one token), the
collector that masks and sums the kernels' outputs inside forward hooks, and the public
functions.

How it is computed, and why:

* A forward hook on each decoder block sees the block's input and output, adds the
  kernel's per-token values to a running fp32 sum on the block's own device, and drops
  both tensors. Nothing of size tokens × hidden outlives the hook, so the overhead is
  O(L) numbers; ``output_hidden_states`` would keep all L+1 states alive at once.
* The kernels work in fp32 even for a bf16/fp16 model: "massive activation" tokens reach
  values near 1e4, an fp16 dot product of two of them overflows to inf, and inf/inf is NaN.
* Padding tokens are excluded by the attention mask, with ``torch.where`` rather than a
  multiplication, because padded positions can hold NaN.
* The last layer is compared with its own output. ``hidden_states[-1]`` of a Hugging
  Face model is the output *after* the final norm, which is not what the layer wrote.
* After the last block the pass stops: the final norm and the LM head (vocabulary ×
  tokens logits, the largest tensor of a forward) are never computed.
* The pairwise statistics need the states of earlier layers, so they keep the current
  batch's states: L+1 of them for the similarity matrix, N+1 for angular distances
  alone, and only one token per sequence with ``pair_tokens="last"``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .inputs import check_token_ids, count_batches, iter_batches, model_inputs
from .layers import decoder_layers, stop_after, unwrap_model

__all__ = [
    "LayerStatistics",
    "angular_distance",
    "angular_distance_per_token",
    "block_influence",
    "block_influence_per_token",
    "layer_similarity",
    "layer_statistics",
    "relative_magnitude_per_token",
    "update_ratio_per_token",
    "token_cosine",
]

# Rows of at most this many elements are upcast to fp32 at a time, so a bf16 model's
# statistics never need a full fp32 copy of a batch's hidden states.
_CHUNK_ELEMENTS = 1 << 22
_EPS = 1e-12


# ----------------------------------------------------------------------------- kernels
# One function per statistic, each taking the states of every token, [..., H] x [..., H],
# and returning one fp32 number per token, [...].


def block_influence_per_token(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """ShortGPT's Block Influence at each token, ``1 - cos(x_i, x_{i+1})``
    (Men et al. 2024, arXiv 2403.03853)."""
    return 1.0 - token_cosine(x_in, x_out)


def relative_magnitude_per_token(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``‖f(x)‖ / ‖x + f(x)‖`` at each token, with ``f(x) = x_out - x_in``
    (Samragh et al. 2023, arXiv 2312.09299)."""
    return _per_token(x_in, x_out, lambda x, y: _norm(y - x) / _norm(y).clamp_min(_EPS))


def update_ratio_per_token(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``‖f(x)‖ / ‖x‖`` at each token, with ``f(x) = x_out - x_in``: how large the block's
    update is next to the stream it is added to."""
    return _per_token(x_in, x_out, lambda a, b: _norm(b - a) / _norm(a).clamp_min(_EPS))


def angular_distance_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / π`` at each token, in [0, 1]
    (Gromov et al. 2024, arXiv 2403.17887)."""
    return torch.arccos(token_cosine(a, b).clamp(-1.0, 1.0)) / math.pi


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_t, b_t) = a_tᵀb_t / (‖a_t‖ ‖b_t‖)`` at each token, norms clamped away
    from zero."""
    def cosine(x, y):
        return torch.linalg.vecdot(x, y) / (_norm(x) * _norm(y)).clamp_min(_EPS)

    return _per_token(a, b, cosine)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def _per_token(a: torch.Tensor, b: torch.Tensor, f) -> torch.Tensor:
    """``f`` on fp32 rows of ``a`` and ``b``, a few million elements at a time, on ``b``'s
    device: a bf16 batch never needs a whole fp32 copy, and ``a`` may come from a block
    on another GPU."""
    shape = b.shape[:-1]
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    out = torch.empty(b.shape[0], dtype=torch.float32, device=b.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b.shape[1]))
    for s in range(0, b.shape[0], step):
        out[s:s + step] = f(a[s:s + step].to(b.device).float(), b[s:s + step].float())
    return out.view(shape)


@dataclass
class LayerStatistics:
    """What one hooked pass measured. Tensors are fp32 on the CPU.

    ``block_influence``, ``relative_magnitude`` and ``update_ratio`` have one entry per
    decoder layer; ``state_norm`` one per state of the stream, x_0 … x_L.
    ``layer_similarity`` is (L+1)×(L+1) over the states x_0 … x_L. ``angular_distance``
    is N×L: row ``n-1`` holds d(x_ℓ, x_{ℓ+n}) for ℓ = 0 … L-n and NaN after that.
    ``tokens`` counts the non-padding tokens seen; ``pair_tokens`` says which tokens the
    pairwise statistics averaged over.
    """

    block_influence: torch.Tensor
    tokens: int
    relative_magnitude: torch.Tensor | None = None
    layer_similarity: torch.Tensor | None = None
    angular_distance: torch.Tensor | None = None
    pair_tokens: str | None = None
    state_norm: torch.Tensor | None = None
    update_ratio: torch.Tensor | None = None


# --------------------------------------------------------------------------- the pass


class _Collector:
    """Forward hooks that mask and sum what the kernels return, block by block; ``finish``
    divides the sums by the token counts."""

    def __init__(self, n_layers: int, relative_magnitude: bool, similarity: bool, angular: int,
                 pair_tokens: str, norms: bool = False):
        self.n_layers = n_layers
        self.relative_magnitude = relative_magnitude
        self.norms = norms
        self.norm_sum: dict[int, torch.Tensor] = {}
        self.update_sum: dict[int, torch.Tensor] = {}
        self.similarity = similarity
        self.angular = angular
        self.pair_tokens = pair_tokens
        self.pairs = similarity or angular > 0
        # similarity needs every earlier state; angular distances only the last N
        self.window = n_layers + 1 if similarity else angular
        self.bi_sum: dict[int, torch.Tensor] = {}
        self.rm_sum: dict[int, torch.Tensor] = {}
        self.sim_sum: dict[tuple[int, int], torch.Tensor] = {}
        self.ang_sum: dict[tuple[int, int], torch.Tensor] = {}
        self.tokens = 0
        self.pair_count = 0
        self.seen = 0

    # per batch
    def begin(self, mask: torch.Tensor) -> None:
        self._mask = mask
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._states: deque = deque(maxlen=self.window)
        self.seen = 0
        self.tokens += int(mask.sum())
        if self.pairs and self.pair_tokens == "last":
            # last real token of each row, whether the row is left- or right-padded
            self._last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)
            self.pair_count += int(mask.any(-1).sum())
        elif self.pairs:
            self.pair_count += int(mask.sum())

    # What begin() sets for one batch. A pass that runs every batch through one block before
    # the next (shortgpt_lite.stream) keeps one such state per batch and swaps it in.
    _BATCH_STATE = ("_mask", "_masks", "_states", "_last", "seen")

    def batch_state(self) -> dict:
        return {k: self.__dict__[k] for k in self._BATCH_STATE if k in self.__dict__}

    def resume_batch(self, state: dict) -> None:
        self.__dict__.update(state)

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            self._masks[device] = self._mask.to(device)
        return self._masks[device]

    def _add(self, store: dict, key, per_token: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the sum of ``per_token`` over the real tokens (``torch.where``, not a
        product: padded positions can hold NaN)."""
        total = torch.where(mask, per_token, 0.0).sum()
        store[key] = store[key] + total if key in store else total

    def _pair_states(self, x: torch.Tensor):
        """The token states the pairwise statistics use, and which of them are real."""
        if self.pair_tokens == "last":
            rows = torch.arange(x.shape[0], device=x.device)
            return x[rows, self._last.to(x.device)], self._mask_on(x.device).any(-1)
        return x, self._mask_on(x.device)

    def _add_state(self, index: int, x: torch.Tensor) -> None:
        x, real = self._pair_states(x)
        for j, earlier in self._states:
            if self.similarity:
                self._add(self.sim_sum, (j, index), token_cosine(earlier, x), real)
            if 0 < index - j <= self.angular:
                self._add(self.ang_sum, (j, index), angular_distance_per_token(earlier, x), real)
        if self.window:
            self._states.append((index, x))

    def hook(self, i: int):
        def on_forward(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            mask = self._mask_on(x_out.device)
            self._add(self.bi_sum, i, block_influence_per_token(x_in, x_out), mask)
            if self.relative_magnitude:
                self._add(self.rm_sum, i, relative_magnitude_per_token(x_in, x_out), mask)
            if self.norms:
                self._add(self.norm_sum, i, _per_token(x_in, x_in, lambda a, _: _norm(a)), mask)
                self._add(self.update_sum, i, update_ratio_per_token(x_in, x_out), mask)
                if i == self.n_layers - 1:
                    self._add(self.norm_sum, i + 1, _per_token(x_out, x_out, lambda a, _: _norm(a)),
                              mask)
            if self.pairs:
                if i == 0:
                    self._add_state(0, x_in)
                self._add_state(i + 1, x_out)
            self.seen += 1

        return on_forward

    _SUMS = ("bi_sum", "rm_sum", "sim_sum", "ang_sum", "norm_sum", "update_sum")

    def all_reduce(self) -> None:
        """Sum the token counts and every statistic's sum over the ranks of
        torch.distributed's default group (each rank having seen its own share of the
        data), so that ``finish`` gives every rank the statistics of all of it."""
        import torch.distributed as dist

        keys = [(name, key) for name in self._SUMS for key in sorted(getattr(self, name))]
        values = [float(getattr(self, name)[key]) for name, key in keys]
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        packed = torch.tensor([float(self.tokens), float(self.pair_count)] + values,
                              dtype=torch.float64, device=device)
        low = torch.tensor([packed.numel()], device=device)
        high = low.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if int(low) != int(high):  # every rank sees this, so every rank raises
            raise RuntimeError("The ranks measured different statistics: every rank must run "
                               "the same options on a model with the same layers.")
        dist.all_reduce(packed)
        self.tokens, self.pair_count = int(packed[0]), int(packed[1])
        for (name, key), value in zip(keys, packed[2:].tolist()):
            getattr(self, name)[key] = torch.tensor(value, dtype=torch.float32)

    def finish(self) -> LayerStatistics:
        if self.tokens == 0:
            raise ValueError("The calibration data has no non-padding tokens.")
        n = self.n_layers

        def per_layer(sums):
            return torch.stack([sums[i].detach().float().cpu() for i in range(n)]) / self.tokens

        stats = LayerStatistics(block_influence=per_layer(self.bi_sum), tokens=self.tokens)
        if self.relative_magnitude:
            stats.relative_magnitude = per_layer(self.rm_sum)
        if self.norms:
            stats.update_ratio = per_layer(self.update_sum)
            stats.state_norm = torch.stack([self.norm_sum[i].detach().float().cpu()
                                            for i in range(n + 1)]) / self.tokens
        if self.pairs:
            stats.pair_tokens = self.pair_tokens
            count = max(1, self.pair_count)
        if self.similarity:
            sim = torch.eye(n + 1, dtype=torch.float32)
            for (i, j), s in self.sim_sum.items():
                sim[i, j] = sim[j, i] = float(s) / count
            stats.layer_similarity = sim
        if self.angular:
            ang = torch.full((self.angular, n), float("nan"), dtype=torch.float32)
            for (i, j), d in self.ang_sum.items():
                ang[j - i - 1, i] = float(d) / count
            stats.angular_distance = ang
        return stats


def make_collector(n: int, relative_magnitude: bool, similarity: bool, angular: int,
               pair_tokens: str, norms: bool) -> _Collector:
    if not isinstance(angular, int) or isinstance(angular, bool) or not 0 <= angular <= n:
        raise ValueError(f"angular is the largest block size n to measure, an integer from 0 to "
                         f"the number of layers ({n}); got {angular!r}.")
    if pair_tokens not in ("all", "last"):
        raise ValueError(f"pair_tokens must be 'all' or 'last', got {pair_tokens!r}.")
    return _Collector(n, relative_magnitude, similarity, angular, pair_tokens, norms)


def resolve_model(model, stream: bool, device="auto", dtype=None):
    """``model`` as the pass needs it: a name or folder stays one for a streamed pass and
    is loaded (on ``device``, in ``dtype``) otherwise; a loaded model cannot be streamed."""
    if isinstance(model, nn.Module):
        if stream:
            raise ValueError("stream=True reads the model from disk one block at a time: pass "
                             "its folder, hub id or bundled name, not a loaded model.")
        return model
    if stream:
        return model
    from transformers import AutoModelForCausalLM

    from .models import model_source, pick_device, quiet_transformers, resolve_dtype

    dev = pick_device(device)
    with quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(model_source(str(model)),
                                                      dtype=resolve_dtype(dtype, dev))
    return loaded.to(dev).eval()


def layer_statistics(model, data, *, batch_size: int = 8,
                     relative_magnitude: bool = False, similarity: bool = False,
                     angular: int = 0, pair_tokens: str = "all", norms: bool = False,
                     stream: bool = False, resume_dir=None, distributed: bool = False,
                     device="auto", dtype=None, progress: bool = True) -> LayerStatistics:
    """Every per-layer statistic this library uses, from a single hooked forward pass.

    Always measures Block Influence; ``relative_magnitude=True`` adds ‖f(x)‖/‖x+f(x)‖,
    ``similarity=True`` the (L+1)×(L+1) cosine-similarity matrix of the layer states,
    and ``angular=N`` Gromov et al.'s angular distances for blocks of 1 … N layers.
    ``pair_tokens`` (``"all"`` or ``"last"``) picks the tokens the pairwise statistics
    average over. ``norms=True`` adds the mean norm ``E_t‖x_i‖`` of every state of the
    stream (``state_norm``, L+1 entries, the last one the last block's own output) and the
    relative size of each block's update ``E_t[‖f_i(x_i)‖ / ‖x_i‖]`` (``update_ratio``).
    The formulas are the kernels at the top of this module. ``data`` is anything
    :func:`shortgpt_lite.inputs.iter_batches` accepts. The model runs in eval mode without
    gradients and is returned to its previous mode afterwards.

    ``model`` is a loaded model, or a model folder, hub id or bundled model's name, loaded
    on ``device`` in ``dtype`` (see :func:`shortgpt_lite.models.load_model`). With
    ``stream=True`` the latter is never loaded whole: each decoder block is read from the
    safetensors shards, run on every batch and freed
    (:func:`shortgpt_lite.stream.streamed_layer_statistics`, which also takes
    ``resume_dir`` to survive an interruption).

    ``distributed=True`` is for data-parallel scoring under ``torchrun``: each rank passes
    its own share of the calibration data, and the per-layer sums are all-reduced over
    torch.distributed's default group, so every rank returns the statistics of all of it.
    """
    model = resolve_model(model, stream, device, dtype)
    if stream:
        from .stream import streamed_layer_statistics

        return streamed_layer_statistics(
            model, data, batch_size=batch_size, relative_magnitude=relative_magnitude,
            similarity=similarity, angular=angular, pair_tokens=pair_tokens, norms=norms,
            resume_dir=resume_dir, distributed=distributed, device=device, dtype=dtype,
            progress=progress)
    if resume_dir is not None:
        raise ValueError("resume_dir keeps the state of a streamed pass: use it with stream=True.")
    layers = decoder_layers(model)
    n = len(layers)
    collector = make_collector(n, relative_magnitude, similarity, angular, pair_tokens, norms)
    handles = [layer.register_forward_hook(collector.hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = tqdm(iter_batches(data, batch_size), total=count_batches(data, batch_size),
                           desc="layer statistics", unit="batch", disable=not progress)
            for ids, mask in batches:
                check_token_ids(model, ids)
                collector.begin(mask)
                with stop_after(layers[-1]):  # the final norm and the LM head are not needed
                    model(**model_inputs(model, ids, mask))
                if collector.seen != n:
                    raise RuntimeError(
                        f"Only {collector.seen} of the {n} decoder layers of "
                        f"{type(unwrap_model(model)).__name__} ran; does config.num_hidden_layers "
                        f"match len(decoder_layers(model))?")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if distributed:
        collector.all_reduce()
    return collector.finish()


def block_influence(model, data, *, batch_size: int = 8, stream: bool = False,
                    resume_dir=None, distributed: bool = False,
                    progress: bool = True) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder layer, ``Tensor[L]`` (fp32, CPU).

    ``BI_i = 1 - E_{X,t}[cos(x_{i,t}, x_{i+1,t})]`` over every non-padding token
    (Men et al. 2024). Lower means the layer changes its input less: delete it
    first. ``data`` is a LongTensor of token windows ``[n, seq_len]`` or an iterable of
    batches with attention masks (see :func:`shortgpt_lite.inputs.iter_batches`). One
    forward pass, stopped after the last layer; memory overhead O(L). ``stream``,
    ``resume_dir`` and ``distributed``: see :func:`layer_statistics`.
    """
    return layer_statistics(model, data, batch_size=batch_size, stream=stream,
                            resume_dir=resume_dir, distributed=distributed,
                            progress=progress).block_influence


def layer_similarity(model: nn.Module, data, *, batch_size: int = 8, tokens: str = "all",
                     progress: bool = True) -> torch.Tensor:
    """The (L+1)×(L+1) matrix ``S[i, j] = E_t[cos(x_i, x_j)]`` over the states entering
    each layer and leaving the last; ``1 - S[i, i+1]`` is ``BI_i``."""
    return layer_statistics(model, data, batch_size=batch_size, similarity=True,
                            pair_tokens=tokens, progress=progress).layer_similarity


def angular_distance(model: nn.Module, data, *, max_n: int | None = None, tokens: str = "last",
                     batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Gromov et al.'s angular distance ``d(x_ℓ, x_{ℓ+n}) = E[arccos(cos(x_ℓ, x_{ℓ+n}))/π]``
    for blocks of ``n = 1 … max_n`` layers (default: all), as a ``[max_n, L]`` tensor
    whose row ``n-1`` is NaN past ``ℓ = L-n``. ``tokens="last"`` (the paper's choice)
    uses each sequence's last real token; ``"all"`` every token.

    The block of ``n`` layers to prune is ``ℓ* … ℓ*+n-1`` with
    ``ℓ* = argmin(row n-1)`` (Gromov et al. 2024, their layer-pruning algorithm).
    """
    n = len(decoder_layers(model)) if max_n is None else max_n
    return layer_statistics(model, data, batch_size=batch_size, angular=n, pair_tokens=tokens,
                            progress=progress).angular_distance
