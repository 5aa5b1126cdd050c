"""The one hooked pass: statistics of the residual stream, every layer, one forward.

Write ``x_i`` for the hidden state entering decoder layer ``i`` and ``x_{i+1}`` for the
state leaving it (``i = 0 … L-1``; ``x_0`` is the embedding output). ShortGPT's Block
Influence (Men et al. 2024, arXiv 2403.03853, the BI definition in its method section) is

    BI_i = 1 - E_{X,t} [ x_{i,t}ᵀ x_{i+1,t} / (‖x_{i,t}‖ ‖x_{i+1,t}‖) ]

averaged over every non-padding token ``t`` of every calibration sequence ``X``. A layer
that barely turns the residual stream has a low BI and is deleted first.

How it is computed, and why:

* A forward hook on each decoder block sees the block's input and output. It adds the
  per-token cosines to a running fp32 sum on the block's own device, then drops both
  tensors. Nothing of size tokens × hidden outlives the hook, so the overhead is O(L)
  numbers. ``output_hidden_states`` would keep all L+1 states alive at once.
* The cosine is computed in fp32 even for a bf16/fp16 model: "massive activation"
  tokens reach values near 1e4, an fp16 dot product of two of them overflows to inf,
  and inf/inf is NaN.
* Padding tokens are excluded by the attention mask, with ``torch.where`` rather than a
  multiplication, because padded positions can hold NaN.
* The last layer is compared with its own output. ``hidden_states[-1]`` of a Hugging
  Face model is the output *after* the final norm, which is not what the layer wrote.
* After the last block the pass stops: the final norm and the LM head (vocabulary ×
  tokens logits, the largest tensor of a forward) are never computed.

The same pass can also collect, at no extra forward:

* ``relative_magnitude_i = E_t[ ‖f_i(x)‖ / ‖x + f_i(x)‖ ]`` with ``f_i(x) = x_{i+1} - x_i``
  (Samragh et al. 2023, "Weight subcloning", arXiv 2312.09299);
* ``layer_similarity[i, j] = E_t[cos(x_i, x_j)]`` for every pair of states, the
  (L+1)×(L+1) matrix behind the layer-similarity heatmaps;
* ``angular_distance[n-1, ℓ] = E[ arccos(cos(x_ℓ, x_{ℓ+n})) / π ]``, Gromov et al. 2024
  ("The Unreasonable Ineffectiveness of the Deeper Layers", arXiv 2403.17887) for blocks of
  ``n = 1 … N`` layers. Gromov et al. use the last token of each sequence
  (``pair_tokens="last"``); ``"all"`` averages over every token.

The pairwise statistics need the states of earlier layers, so they keep the current
batch's unit-normalised states: (L+1) × batch tokens × hidden fp32 numbers for the
similarity matrix (N+1 states for angular distances alone), or only one token per
sequence with ``pair_tokens="last"``.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import decoder_layers, unwrap_model

__all__ = [
    "LayerStatistics",
    "angular_distance",
    "cache_keyword",
    "block_influence",
    "input_device",
    "iter_batches",
    "layer_similarity",
    "layer_statistics",
    "model_inputs",
    "token_cosine",
]

# Rows of at most this many elements are upcast to fp32 at a time, so a bf16 model's
# statistics never need a full fp32 copy of a batch's hidden states.
_CHUNK_ELEMENTS = 1 << 22
_EPS = 1e-12


class _StopForward(Exception):
    """Raised by the last block's hook: everything after it is not needed."""


@dataclass
class LayerStatistics:
    """What one hooked pass measured. Tensors are fp32 on the CPU.

    ``block_influence`` and ``relative_magnitude`` have one entry per decoder layer.
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
        raise ValueError(  # noqa: TRY004 - the house rule: user errors are ValueErrors
            "data must be a LongTensor of token windows [n, seq_len] or an iterable "
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


def _count_batches(data, batch_size):
    if isinstance(data, torch.Tensor):
        return math.ceil(data.shape[0] / batch_size) if data.dim() == 2 else None
    if isinstance(data, Mapping) and "input_ids" in data:
        return math.ceil(len(data["input_ids"]) / batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids must go: the device of its input embedding."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


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


# ----------------------------------------------------------------------------- cosines


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _per_token_fp32(a: torch.Tensor, b: torch.Tensor, f) -> torch.Tensor:
    """``f(a_t, b_t)`` for every token row, in fp32, a few million elements at a time,
    so a bf16 input never needs a whole fp32 copy: ``[..., H] x [..., H] -> [...]``."""
    shape = a.shape[:-1]
    a, b = _rows(a), _rows(b)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[1]))
    for s in range(0, a.shape[0], step):
        out[s:s + step] = f(a[s:s + step].float(), b[s:s + step].float())
    return out.view(shape)


def _cosine_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return torch.linalg.vecdot(x, y) / norms.clamp_min(_EPS)


def _relative_magnitude_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(y - x, dim=-1) / torch.linalg.vector_norm(y, dim=-1).clamp_min(_EPS)


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_t, b_t) for every token ``t``, computed in fp32: ``[..., H] x [..., H] -> [...]``.

    ``aᵀb / (‖a‖ ‖b‖)`` with the norms clamped away from zero. Works a few million
    elements at a time, so a bf16 input never needs a whole fp32 copy.
    """
    return _per_token_fp32(a, b, _cosine_rows)


def _relative_magnitude(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """‖x_out - x_in‖ / ‖x_out‖ per token in fp32, i.e. ‖f(x)‖ / ‖x + f(x)‖."""
    return _per_token_fp32(x_in, x_out, _relative_magnitude_rows)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = _rows(x).float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_EPS)


def _row_dots(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.empty(u.shape[0], dtype=torch.float32, device=v.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, u.shape[1]))
    for s in range(0, u.shape[0], step):
        out[s:s + step] = torch.linalg.vecdot(u[s:s + step].to(v.device), v[s:s + step])
    return out.clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------- the pass


class _Collector:
    """Forward hooks that turn each block's input and output into running sums."""

    def __init__(self, n_layers: int, relative_magnitude: bool, similarity: bool, angular: int,
                 pair_tokens: str):
        self.n_layers = n_layers
        self.relative_magnitude = relative_magnitude
        self.similarity = similarity
        self.angular = angular
        self.pair_tokens = pair_tokens
        self.pairs = similarity or angular > 0
        # similarity needs every earlier state; angular distances only the last N
        self.window = n_layers + 1 if similarity else angular
        self.bi_sum: list[torch.Tensor | None] = [None] * n_layers
        self.rm_sum: list[torch.Tensor | None] = [None] * n_layers
        self.sim_sum: dict[tuple[int, int], torch.Tensor] = {}
        self.ang_sum: dict[tuple[int, int], torch.Tensor] = {}
        self.tokens = 0
        self.pair_count = 0

    # per batch
    def begin(self, mask: torch.Tensor) -> None:
        self._mask = mask
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._states: deque = deque(maxlen=self.window)
        self._seen = 0
        self.tokens += int(mask.sum())
        if self.pairs:
            if self.pair_tokens == "last":
                t = mask.shape[1]
                # last real token of each row, whether the row is left- or right-padded
                self._last = t - 1 - mask.flip(-1).int().argmax(-1)
                self._has_tokens = mask.any(-1)
                self.pair_count += int(self._has_tokens.sum())
            else:
                self.pair_count += int(mask.sum())

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            self._masks[device] = self._mask.to(device)
        return self._masks[device]

    @staticmethod
    def _add(store: list, i: int, value: torch.Tensor) -> None:
        store[i] = value if store[i] is None else store[i] + value

    def _pair_rows(self, x: torch.Tensor):
        """Unit rows of the tokens the pairwise statistics use, and their mask."""
        device = x.device
        if self.pair_tokens == "last":
            rows = torch.arange(x.shape[0], device=device)
            picked = x[rows, self._last.to(device)]
            return _unit_rows(picked), self._has_tokens.to(device)
        return _unit_rows(x), self._mask_on(device).reshape(-1)

    def _add_state(self, index: int, x: torch.Tensor) -> None:
        u, keep = self._pair_rows(x)
        for j, v in self._states:
            cos = _row_dots(v, u)
            if self.similarity:
                s = torch.where(keep, cos, 0.0).sum()
                self.sim_sum[j, index] = self.sim_sum[j, index] + s if (j, index) in self.sim_sum else s
            if 0 < index - j <= self.angular:
                d = torch.where(keep, torch.arccos(cos) / math.pi, 0.0).sum()
                self.ang_sum[j, index] = self.ang_sum[j, index] + d if (j, index) in self.ang_sum else d
        if self.window:
            self._states.append((index, u))

    def hook(self, i: int):
        last = i == self.n_layers - 1

        def on_forward(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            device = x_out.device
            x_in = x_in.to(device, non_blocking=True)
            mask = self._mask_on(device)
            self._add(self.bi_sum, i, torch.where(mask, token_cosine(x_in, x_out), 0.0).sum())
            if self.relative_magnitude:
                rm = _relative_magnitude(x_in, x_out)
                self._add(self.rm_sum, i, torch.where(mask, rm, 0.0).sum())
            if self.pairs:
                if i == 0:
                    self._add_state(0, x_in)
                self._add_state(i + 1, x_out)
            self._seen += 1
            if last:
                raise _StopForward

        return on_forward

    def finish(self) -> LayerStatistics:
        if self.tokens == 0:
            raise ValueError("The calibration data has no non-padding tokens.")
        n = self.n_layers

        def per_layer(sums):
            return torch.stack([s.detach().float().cpu() for s in sums]) / self.tokens

        stats = LayerStatistics(block_influence=1.0 - per_layer(self.bi_sum), tokens=self.tokens)
        if self.relative_magnitude:
            stats.relative_magnitude = per_layer(self.rm_sum)
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


def layer_statistics(model: nn.Module, data, *, batch_size: int = 8,
                     relative_magnitude: bool = False, similarity: bool = False,
                     angular: int = 0, pair_tokens: str = "all",
                     progress: bool = True) -> LayerStatistics:
    """Every per-layer statistic this library uses, from a single hooked forward pass.

    Always measures Block Influence; ``relative_magnitude=True`` adds ‖f(x)‖/‖x+f(x)‖,
    ``similarity=True`` the (L+1)×(L+1) cosine-similarity matrix of the layer states,
    and ``angular=N`` Gromov et al.'s angular distances for blocks of 1 … N layers.
    ``pair_tokens`` (``"all"`` or ``"last"``) picks the tokens the pairwise statistics
    average over. See the module docstring for the formulas. ``data`` is anything
    :func:`iter_batches` accepts. The model runs in eval mode without gradients and is
    returned to its previous mode afterwards.
    """
    layers = decoder_layers(model)
    n = len(layers)
    if not isinstance(angular, int) or isinstance(angular, bool) or not 0 <= angular <= n:
        raise ValueError(f"angular is the largest block size n to measure, an integer from 0 to "
                         f"the number of layers ({n}); got {angular!r}.")
    if pair_tokens not in ("all", "last"):
        raise ValueError(f"pair_tokens must be 'all' or 'last', got {pair_tokens!r}.")
    collector = _Collector(n, relative_magnitude, similarity, angular, pair_tokens)
    handles = [layer.register_forward_hook(collector.hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = tqdm(iter_batches(data, batch_size), total=_count_batches(data, batch_size),
                           desc="layer statistics", unit="batch", disable=not progress)
            for ids, mask in batches:
                collector.begin(mask)
                try:
                    model(**model_inputs(model, ids, mask))
                except _StopForward:
                    pass
                if collector._seen != n:
                    raise RuntimeError(
                        f"Only {collector._seen} of the {n} decoder layers of "
                        f"{type(unwrap_model(model)).__name__} ran; does config.num_hidden_layers "
                        f"match len(decoder_layers(model))?")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return collector.finish()


def block_influence(model: nn.Module, data, *, batch_size: int = 8,
                    progress: bool = True) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder layer, ``Tensor[L]`` (fp32, CPU).

    ``BI_i = 1 - E_{X,t}[cos(x_{i,t}, x_{i+1,t})]`` over every non-padding token
    (Men et al. 2024). Lower means the layer changes its input less: delete it
    first. ``data`` is a LongTensor of token windows ``[n, seq_len]`` or an iterable of
    batches with attention masks (see :func:`iter_batches`). One forward pass, stopped
    after the last layer; memory overhead O(L).
    """
    return layer_statistics(model, data, batch_size=batch_size, progress=progress).block_influence


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
