"""Mini-GPT context pruning: keep what one domain uses, remove the rest.

Valicenti et al. 2023 ("Mini-GPTs: Efficient Large Language Models through Contextual
Pruning", arXiv 2312.12682) run a model over one domain's text and prune what that
domain leaves idle:

* **Linear layers**: the mean absolute output of each output neuron ``j`` over
  the calibration tokens, :math:`a_j = \\frac1T\\sum_t |y_{t,j}|`; a neuron whose
  value falls below a threshold loses its row of ``W`` (and its bias).
* **Activation layers**: the same for each MLP activation neuron. For the gated
  MLPs of Llama-family models, ``down(act(gate x) ⊙ up x)``, the neuron's value is the
  input of ``down_proj``, :math:`h_j = \\mathrm{act}(g_j) u_j`: what the neuron passes
  on. Pruning it removes row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of
  ``down_proj``.
* **Embeddings**: token frequencies in the domain's text; tokens the domain never
  uses lose their embedding row. Special tokens are always kept.

Here the values are normalised per layer, :math:`\\hat a_j = a_j / \\max_k a_k \\in [0, 1]`,
so one threshold means the same in every layer. That is this library's variant: the
paper's released code compares the raw mean :math:`a_j` with its thresholds (1e-3 for
mild and 1e-1 for aggressive pruning), so the same number prunes different shares in
layers of different scale. Instead of a threshold, ``fraction`` prunes the lowest share
of neurons in every layer, which fixes the size in advance.

The paper only zeroes weights. ``context_prune(..., physical=True)`` also removes the
pruned MLP neurons, so the matrices are really smaller and the model faster.
transformers keeps one ``intermediate_size`` for all layers, so the pruned width must be
the same in every layer to reload with plain ``AutoModelForCausalLM.from_pretrained``:

* with ``fraction``, every layer prunes the same count and the width is exact;
* with ``threshold``, layers prune different counts; the saved width is the largest
  kept count over the layers, and narrower layers fill their spare slots with neurons
  whose ``gate``/``up`` rows and ``down`` column are zero. Such a neuron outputs
  ``act(0) · 0 = 0`` and adds nothing, so the model computes exactly what the masked
  model computes.

:func:`shrink_vocabulary` removes the embedding rows of unused tokens outright and
returns a :class:`VocabularyMap` between the tokenizer's ids and the model's new ones.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import check_windows, load_text, token_windows
from .inputs import check_token_ids, input_device, vocab_rows
from .layers import decoder_layers, sliced_linear, stop_after, unwrap_model
from .records import CONTEXT_RECORD

__all__ = [
    "DOMAINS",
    "ContextPlan",
    "ContextStatistics",
    "VocabularyMap",
    "context_plan",
    "context_prune",
    "context_statistics",
    "domain_windows",
    "gated_mlp",
    "neuron_mask",
    "normalised_l1",
    "shrink_vocabulary",
]

DOMAINS = ("law", "medicine", "code", "economics")


def domain_windows(tokenizer, domain: str, seq_len: int = 512,
                   max_windows: int | None = 64) -> torch.Tensor:
    """Calibration windows ``[n, seq_len]`` from the calibration half of a domain's text
    (one of :data:`DOMAINS`)."""
    if domain not in DOMAINS:
        raise ValueError(f"Unknown domain {domain!r}. Context pruning calibrates on one of: "
                         f"{', '.join(DOMAINS)}.")
    return token_windows(tokenizer, load_text(domain, "calibration"), seq_len, max_windows)


# ----------------------------------------------------------------------- statistics


@dataclass
class ContextStatistics:
    """What a domain uses, measured on its calibration text.

    ``linear``: mean :math:`|y_j|` per output neuron of every ``nn.Linear`` in the
    decoder blocks, keyed by module name (``"model.layers.0.self_attn.q_proj"``).
    ``activation``: mean :math:`|h_j|` per MLP activation neuron, keyed by block index.
    ``token_counts``: how often each token id occurs. ``tokens``: calibration tokens.
    """

    linear: dict[str, torch.Tensor]
    activation: dict[int, torch.Tensor]
    token_counts: torch.Tensor
    tokens: int
    domain: str | None = None


def gated_mlp(block: nn.Module) -> nn.Module | None:
    """The block's gated MLP (``gate_proj``, ``up_proj``, ``down_proj``), if it has one."""
    for module in block.modules():
        if all(isinstance(getattr(module, n, None), nn.Linear)
               for n in ("gate_proj", "up_proj", "down_proj")):
            return module
    return None


def context_statistics(model: nn.Module, windows: torch.Tensor, *, domain: str | None = None,
                       batch_size: int = 8, progress: bool = True) -> ContextStatistics:
    """One forward pass over ``windows`` (a LongTensor ``[n, seq_len]``, e.g. from
    :func:`domain_windows`) collecting :class:`ContextStatistics`.

    :math:`a_j = \\frac1T \\sum_t |y_{t,j}|` for every linear output neuron and every
    MLP activation neuron, summed in fp32, and a count of every token id. The
    pass stops after the last decoder block: the LM head is not needed.
    """
    check_windows(windows, "domain_windows(tokenizer, 'law')")
    check_token_ids(model, windows)
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"Unknown domain {domain!r}; use one of: {', '.join(DOMAINS)}.")
    inner = unwrap_model(model)
    blocks = decoder_layers(model)
    names = {m: n for n, m in inner.named_modules()}
    linear_sums: dict[str, torch.Tensor] = {}
    act_sums: dict[int, torch.Tensor] = {}
    handles = []

    def on_linear(name):
        def hook(module, args, output):
            y = output.detach()
            s = y.reshape(-1, y.shape[-1]).float().abs().sum(0)
            linear_sums[name] = linear_sums[name] + s if name in linear_sums else s
        return hook

    def on_activation(b):
        def hook(module, args):
            h = args[0].detach()
            s = h.reshape(-1, h.shape[-1]).float().abs().sum(0)
            act_sums[b] = act_sums[b] + s if b in act_sums else s
        return hook

    for b, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(on_linear(names[module])))
        mlp = gated_mlp(block)
        if mlp is not None:
            handles.append(mlp.down_proj.register_forward_pre_hook(on_activation(b)))
    device = input_device(model)
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc="context statistics",
                              disable=not progress):
                with stop_after(blocks[-1]):  # the LM head is not needed
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = int(windows.numel())
    vocab = vocab_rows(model)
    return ContextStatistics(
        linear={n: (s / tokens).cpu() for n, s in linear_sums.items()},
        activation={b: (s / tokens).cpu() for b, s in act_sums.items()},
        token_counts=torch.bincount(windows.flatten().cpu(), minlength=vocab),
        tokens=tokens, domain=domain)


# ---------------------------------------------------------------------------- plans


def normalised_l1(values: torch.Tensor) -> torch.Tensor:
    """:math:`\\hat a_j = a_j / \\max_k a_k`: a layer's mean absolute activations scaled
    into [0, 1], so one threshold fits layers of any scale (all zeros stay zeros)."""
    values = values.float()
    top = values.max() if values.numel() else values.new_tensor(0.0)
    return values / top if top > 0 else torch.zeros_like(values)


def _check_rule(threshold, fraction) -> None:
    if (threshold is None) == (fraction is None):
        raise ValueError("Pass exactly one of threshold= (prune normalised values below it, "
                         "e.g. 1e-3) or fraction= (prune that share of each layer, e.g. 0.25).")
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold is compared with values normalised into [0, 1]; got "
                         f"{threshold}. Use a value such as 1e-3 (mild) or 1e-1 (aggressive).")
    if fraction is not None and not (0.0 <= float(fraction) < 1.0):
        raise ValueError(f"fraction must be in [0, 1), got {fraction}: it is the share of neurons "
                         "pruned in every layer, and at least one must stay.")


def neuron_mask(values: torch.Tensor, *, threshold: float | None = None,
                fraction: float | None = None) -> torch.Tensor:
    """Which neurons to prune (``True``) from their mean absolute activations.

    ``threshold``: every neuron with :math:`\\hat a_j <` ``threshold`` (see
    :func:`normalised_l1`), never all of them (the strongest stays). ``fraction``: the
    ``round(fraction · n)`` neurons with the lowest values, ties to the lower index.
    """
    _check_rule(threshold, fraction)
    values = values.float().flatten()
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    if threshold is not None:
        mask = normalised_l1(values) < threshold
        if mask.all():
            mask[values.argmax()] = False
        return mask
    k = round(float(fraction) * values.numel())
    mask[torch.sort(values, stable=True).indices[:k]] = True
    return mask


@dataclass
class ContextPlan:
    """What :func:`context_prune` removes. ``linear``: rows to prune per linear module
    name; ``activation``: MLP neurons to prune per block index; ``tokens``: embedding rows
    to prune (``None`` when embeddings are left alone)."""

    linear: dict[str, torch.Tensor] = field(default_factory=dict)
    activation: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    rule: dict = field(default_factory=dict)


def context_plan(stats: ContextStatistics, *, threshold: float | None = None,
                 fraction: float | None = None, linear: bool = True, activation: bool = True,
                 embeddings: bool = True, min_count: int = 0,
                 keep_tokens=()) -> ContextPlan:
    """Turn :class:`ContextStatistics` into a :class:`ContextPlan`.

    ``threshold`` or ``fraction`` (exactly one) applies to every linear layer (if
    ``linear``) and every MLP activation layer (if ``activation``), layer by layer (see
    :func:`neuron_mask`). With ``embeddings``, tokens seen at most ``min_count`` times
    are pruned, except ``keep_tokens`` (pass the tokenizer's ``all_special_ids``).
    """
    _check_rule(threshold, fraction)
    if not (linear or activation or embeddings):
        raise ValueError("Nothing to prune: set at least one of linear, activation, embeddings.")
    plan = ContextPlan(rule={"threshold": threshold, "fraction": fraction, "linear": linear,
                             "activation": activation, "embeddings": embeddings,
                             "min_count": min_count, "domain": stats.domain})
    if linear:
        plan.linear = {n: neuron_mask(v, threshold=threshold, fraction=fraction)
                       for n, v in stats.linear.items()}
    if activation:
        if not stats.activation:
            raise LookupError("The statistics hold no MLP activations: this model's blocks have "
                              "no gated MLP (gate_proj, up_proj, down_proj). Use activation=False.")
        plan.activation = {b: neuron_mask(v, threshold=threshold, fraction=fraction)
                           for b, v in stats.activation.items()}
    if embeddings:
        unused = stats.token_counts <= min_count
        keep = torch.as_tensor(list(keep_tokens), dtype=torch.long)
        if keep.numel():
            unused[keep[(keep >= 0) & (keep < unused.numel())]] = False
        plan.tokens = unused
    return plan


def random_plan(like: ContextPlan, *, seed: int = 0) -> ContextPlan:
    """The control for a :class:`ContextPlan`: in every layer it prunes as many neurons (and
    as many embedding rows) as ``like`` does, drawn uniformly at random with ``seed``. What
    ``like`` does better than this plan is what the activation statistic bought."""
    g = torch.Generator().manual_seed(seed)

    def same_count(mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(mask, dtype=torch.bool)
        out[torch.randperm(mask.numel(), generator=g)[:int(mask.sum())]] = True
        return out

    return ContextPlan(linear={n: same_count(m) for n, m in like.linear.items()},
                       activation={b: same_count(m) for b, m in like.activation.items()},
                       tokens=None if like.tokens is None else same_count(like.tokens),
                       rule={**like.rule, "random_seed": seed})


# ---------------------------------------------------------------------------- pruning


def _zero_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight[rows] = 0
    if linear.bias is not None:
        linear.bias[rows] = 0


def _shrink_mlp(mlp: nn.Module, keep: torch.Tensor, width: int) -> None:
    """Keep the MLP neurons listed in ``keep`` (in order), padded with zeroed neurons up
    to ``width``, by slicing ``gate``/``up`` rows and ``down`` columns."""
    pad = width - keep.numel()
    mlp.gate_proj = sliced_linear(mlp.gate_proj, keep, 0, pad)
    mlp.up_proj = sliced_linear(mlp.up_proj, keep, 0, pad)
    mlp.down_proj = sliced_linear(mlp.down_proj, keep, 1, pad)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


def context_prune(model: nn.Module, plan: ContextPlan, *, physical: bool = False,
                  inplace: bool = False, progress: bool = True) -> nn.Module:
    """Apply a :class:`ContextPlan`: zero the pruned rows of linear layers, the pruned MLP
    neurons (``gate``/``up`` rows and ``down`` columns) and the embeddings of pruned
    tokens, as the paper does.

    With ``physical=True`` the pruned MLP neurons are removed instead of zeroed and
    ``config.intermediate_size`` becomes the new width (the largest kept count over the
    layers; narrower layers are padded with zero neurons, see the module docstring), so
    the model is smaller and faster and reloads with plain transformers. Embedding rows
    are zeroed either way; :func:`shrink_vocabulary` removes them.

    Returns the pruned model (a deep copy unless ``inplace=True``); the rule and the
    counts are recorded in ``config.shortgpt_lite_context``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    blocks = decoder_layers(model)
    missing = [n for n in plan.linear if n not in modules]
    if missing:
        raise LookupError(f"The plan names linear layers this model does not have ({missing[:3]}"
                          "...); build the plan from statistics of this model.")
    mlps = {b: gated_mlp(blocks[b]) for b in plan.activation}
    if physical and (not plan.activation or any(m is None for m in mlps.values())):
        raise LookupError("physical=True removes MLP activation neurons: it needs a plan with "
                          "activation=True on a model with gated MLPs (gate_proj, up_proj, "
                          "down_proj).")
    with torch.no_grad():
        for name, rows in tqdm(plan.linear.items(), desc="context pruning", disable=not progress):
            _zero_rows(modules[name], rows)
        for b, mlp in mlps.items():
            neurons = plan.activation[b]
            _zero_rows(mlp.gate_proj, neurons)
            _zero_rows(mlp.up_proj, neurons)
            mlp.down_proj.weight[:, neurons.to(mlp.down_proj.weight.device)] = 0
        if plan.tokens is not None:
            emb = model.get_input_embeddings()
            emb.weight[plan.tokens.to(emb.weight.device)] = 0
            out = model.get_output_embeddings()
            if out is not None and out.weight is not emb.weight \
                    and out.weight.shape[0] == plan.tokens.numel():
                out.weight[plan.tokens.to(out.weight.device)] = 0
        width = None
        if physical:
            width = max(int((~m).sum()) for m in plan.activation.values())
            for b, mlp in mlps.items():
                _shrink_mlp(mlp, torch.nonzero(~plan.activation[b]).flatten(), width)
            inner.config.get_text_config().intermediate_size = width
    setattr(inner.config, CONTEXT_RECORD, {
        **plan.rule,
        "physical": physical,
        "intermediate_size": width,
        "pruned_linear_rows": int(sum(int(m.sum()) for m in plan.linear.values())),
        "pruned_mlp_neurons": [int(plan.activation[b].sum()) for b in sorted(plan.activation)],
        "pruned_tokens": None if plan.tokens is None else int(plan.tokens.sum()),
    })
    return model


# ------------------------------------------------------------------------- vocabulary


@dataclass
class VocabularyMap:
    """The bridge between a tokenizer's ids and a model with a shrunk vocabulary.

    ``kept[i]`` is the tokenizer id of the model's token ``i``; ``old_to_new[t]`` is the
    model id of tokenizer id ``t``, or -1 if that token was removed.
    """

    kept: torch.Tensor
    old_to_new: torch.Tensor

    @classmethod
    def from_kept(cls, kept, old_vocab_size: int) -> VocabularyMap:
        kept = torch.as_tensor(kept, dtype=torch.long).flatten()
        old_to_new = torch.full((old_vocab_size,), -1, dtype=torch.long)
        old_to_new[kept] = torch.arange(kept.numel())
        return cls(kept=kept, old_to_new=old_to_new)

    def to_new(self, ids, unknown: int | None = None) -> torch.Tensor:
        """Tokenizer ids -> model ids. A removed token raises ``ValueError`` unless
        ``unknown`` (a model id) is given to stand in for it."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        new = self.old_to_new[ids]
        if (new < 0).any():
            if unknown is None:
                gone = sorted(set(ids[new < 0].flatten().tolist()))[:10]
                raise ValueError(f"Tokens {gone} were removed from this model's vocabulary; pass "
                                 "unknown=<a model id> to replace them, or use text from the "
                                 "domain the vocabulary was shrunk for.")
            new = torch.where(new < 0, torch.as_tensor(unknown), new)
        return new

    def to_old(self, ids) -> torch.Tensor:
        """Model ids -> tokenizer ids (for ``tokenizer.decode``)."""
        return self.kept[torch.as_tensor(ids, dtype=torch.long)]

    def encode(self, tokenizer, text: str, unknown: int | None = None) -> torch.Tensor:
        """``text`` as model ids: the tokenizer's ids mapped by :meth:`to_new`."""
        return self.to_new(tokenizer(text, add_special_tokens=True)["input_ids"], unknown)

    def decode(self, tokenizer, ids, **kwargs) -> str:
        return tokenizer.decode(self.to_old(ids).tolist(), **kwargs)

    def save(self, folder) -> Path:
        """Write ``vocabulary_map.json`` (the kept tokenizer ids) into ``folder``."""
        path = Path(folder) / "vocabulary_map.json"
        path.write_text(json.dumps({"old_vocab_size": self.old_to_new.numel(),
                                    "kept": self.kept.tolist()}))
        return path

    @classmethod
    def load(cls, folder) -> VocabularyMap:
        data = json.loads((Path(folder) / "vocabulary_map.json").read_text())
        return cls.from_kept(data["kept"], data["old_vocab_size"])


def _remap_token_ids(config, mapping: VocabularyMap) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(config, name, None)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        new = [int(mapping.old_to_new[i]) for i in ids if 0 <= i < mapping.old_to_new.numel()]
        if any(i < 0 for i in new):
            raise ValueError(f"config.{name}={value} names a token that is being removed; keep "
                             "the special tokens (pass keep_tokens=tokenizer.all_special_ids).")
        setattr(config, name, new if isinstance(value, list) else (new[0] if new else None))


def shrink_vocabulary(model: nn.Module, keep, *, inplace: bool = False):
    """Remove every embedding row except the token ids in ``keep`` (a boolean mask over
    the vocabulary or a list of ids), from the input embedding and the LM head.

    Typical use: ``keep = ~plan.tokens`` after :func:`context_plan`, whose token mask
    already spares the special tokens. ``config.vocab_size`` and the special token ids
    in the config and generation config are updated, so the model saves and reloads
    with plain transformers. Returns ``(model, VocabularyMap)``; feed the model
    ``mapping.encode(tokenizer, text)`` and decode with ``mapping.decode``.
    """
    emb = model.get_input_embeddings()
    vocab = emb.num_embeddings
    keep = torch.as_tensor(keep)
    if keep.dtype == torch.bool:
        if keep.numel() != vocab:
            raise ValueError(f"A boolean keep mask needs one entry per token ({vocab}), got "
                             f"{keep.numel()}.")
        keep = torch.nonzero(keep).flatten()
    keep = torch.unique(keep.long())
    if keep.numel() == 0:
        raise ValueError("keep is empty: at least one token must stay in the vocabulary.")
    if int(keep.min()) < 0 or int(keep.max()) >= vocab:
        raise ValueError(f"keep holds token ids outside [0, {vocab}).")
    if not inplace:
        model = copy.deepcopy(model)
    inner = unwrap_model(model)
    mapping = VocabularyMap.from_kept(keep, vocab)
    config = inner.config.get_text_config()
    tied = getattr(config, "tie_word_embeddings", False) or \
        getattr(inner.config, "tie_word_embeddings", False)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    with torch.no_grad():
        new_emb = nn.Embedding(keep.numel(), emb.embedding_dim, padding_idx=None,
                               device=emb.weight.device, dtype=emb.weight.dtype)
        new_emb.weight.copy_(emb.weight[keep.to(emb.weight.device)])
        # Gemma-style scaled embeddings keep their class and scale: swap only the weight.
        emb.weight = new_emb.weight
        emb.num_embeddings = keep.numel()
        if getattr(emb, "padding_idx", None) is not None:
            emb.padding_idx = int(mapping.old_to_new[emb.padding_idx]) \
                if mapping.old_to_new[emb.padding_idx] >= 0 else None
        if out is not None:
            if tied:
                out.weight = emb.weight
            else:
                out.weight = nn.Parameter(out.weight[keep.to(out.weight.device)].clone())
            if getattr(out, "bias", None) is not None:
                out.bias = nn.Parameter(out.bias[keep.to(out.bias.device)].clone())
            out.out_features = keep.numel()
    config.vocab_size = keep.numel()
    _remap_token_ids(config, mapping)
    generation = getattr(inner, "generation_config", None)
    if generation is not None:
        _remap_token_ids(generation, mapping)
    record = dict(getattr(inner.config, CONTEXT_RECORD, None) or {})
    record["vocabulary"] = {"old_vocab_size": vocab, "kept_tokens": int(keep.numel())}
    setattr(inner.config, CONTEXT_RECORD, record)
    return model, mapping
