"""Every pruning method on one budget, measured the same way: one DataFrame.

ShortGPT (Men et al. 2024, arXiv 2403.03853) compares layer removal with width pruning at the same
share of removed parameters. :func:`compare` does that for the methods of this library:
each prunes a copy of the model to ``budget``, the fraction of the original parameters
to remove, and each copy is measured by the same functions.

What counts as removed: a weight set to zero (Wanda, magnitude, masked rows) and a
weight that is gone (removed layers, MLP neurons, attention heads). Tied weights count
once. The budget is met as closely as the method's granularity allows: whole layers for
ShortGPT (3.5M parameters each in SmolLM2-135M), whole MLP neurons for width and context
pruning (and whole attention heads for ``width+heads``), single weights for Wanda. Two
methods do not follow the budget, and their rows say so in ``params_removed``: 2:4
sparsity zeroes half of every block's linear weights, and int8 quantization keeps every
parameter and shrinks their storage instead.

========================= ====================================================================
``dense``                 the model as it is
``shortgpt``              remove the layers of lowest Block Influence (Men et al. 2024)
``wanda``                 Wanda, unstructured, per output row (Sun et al. 2023)
``wanda-2:4``             Wanda with 2:4 sparsity in every block linear
``magnitude``             smallest ``|W|`` per output row, data-free (Wanda's baseline)
``width``                 structured width pruning: the MLP neurons of least mean activation on
                          the calibration text, the same count in every layer, physically
                          removed, so that it saves bytes and time as layer removal does
``width+heads``           the same, but about the same share of the attention heads (least
                          mean write into the residual stream) goes too, whole heads per
                          key/value group; on both bundled models it loses more than ``width``
                          at the same budget, so ``width`` is the baseline the book compares
``context``               Mini-GPT context pruning of MLP neurons on ``domain`` text, the
                          same count in every layer, physically removed (Valicenti et al. 2023)
``shortgpt+wanda``        a share ``depth_share`` of the budget (half by default) by layer
                          removal, rounded to whole layers, the rest by Wanda
``int8``                  int8 dynamic quantization of the block linears, nothing removed
``shortgpt+int8``         layer removal at the budget, then int8 (ShortGPT's orthogonality)
========================= ====================================================================

A run writes one JSON file per finished method into ``results_dir``; run it again with
the same settings and finished methods are read back instead of recomputed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .context import (
    DOMAINS,
    context_plan,
    context_prune,
    context_statistics,
    domain_windows,
    gated_mlp,
)
from .costs import param_counts, serialized_bytes, speed_runs, summarise_speeds
from .data import CORPORA, load_text, token_windows
from .evaluate import DEFAULT_SUITE, evaluate_suite, perplexity
from .heads import head_importance, head_params, heads_for_share, remove_heads
from .importance import layer_importance, layers_to_remove
from .inputs import max_positions
from .layers import decoder_layers
from .quantize import quantize_int8
from .removal import remove_layers
from .wanda import magnitude_prune, prunable_parameters, wanda_prune

__all__ = ["DEFAULT_CORPORA", "METHODS", "compare", "prune_to_budget"]

METHODS = {
    "dense": "the unpruned model",
    "shortgpt": "layers of lowest Block Influence removed (ShortGPT)",
    "wanda": "Wanda, unstructured, per output row",
    "wanda-2:4": "Wanda 2:4 in every block linear (50% of them, whatever the budget)",
    "magnitude": "smallest |W| per output row",
    "width": "MLP neurons of least activation on the calibration text, physically removed",
    "width+heads": "attention heads and MLP neurons of least activation on the calibration "
                   "text, about the same share of each, physically removed",
    "context": "Mini-GPT context pruning of MLP neurons, physically removed",
    "shortgpt+wanda": "a share of the budget (half by default) by layer removal, the rest by Wanda",
    "int8": "int8 dynamic quantization of the block linears",
    "shortgpt+int8": "layer removal at the budget, then int8 dynamic quantization",
}

DEFAULT_CORPORA = ("wikipedia", "fiction", "law", "medicine", "code")

# Methods calibrated on token windows, and those whose int8 step runs only on a CPU fp32 model.
_CALIBRATED = ("shortgpt", "wanda", "wanda-2:4", "width", "width+heads", "shortgpt+wanda",
               "shortgpt+int8")
_INT8 = ("int8", "shortgpt+int8")


# ------------------------------------------------------------------------- pruning


def _block_params(model: nn.Module) -> int:
    return sum(p.numel() for p in decoder_layers(model)[0].parameters())


def layers_for(model, n_params: float) -> int:
    """How many whole decoder blocks come closest to ``n_params`` parameters (at least 0,
    and one block short of all of them at most)."""
    n_layers = len(decoder_layers(model))
    return max(0, min(n_layers - 1, round(n_params / _block_params(model))))


def _shortgpt(model, windows, n_params, progress):
    k = layers_for(model, n_params)
    if k == 0:
        return model, {"layers_removed": []}
    scores = layer_importance(model, windows, "bi", progress=progress)
    removed = layers_to_remove(scores, k)
    return (remove_layers(model, removed, scores=scores, metric="bi"),
            {"layers_removed": removed})


def _mlp_neurons(model, windows, n_params, progress):
    """Remove the same number of MLP neurons from every block, those of least mean |activation|
    on ``windows`` (Mini-GPT's statistic), so that about ``n_params`` parameters are gone."""
    stats = context_statistics(model, windows, progress=progress)
    blocks = decoder_layers(model)
    mlp = gated_mlp(blocks[0])
    if mlp is None:
        raise LookupError("width and context pruning remove MLP neurons: they need blocks with a "
                          "gated MLP (gate_proj, up_proj, down_proj), as in Llama-family models.")
    width, hidden = mlp.down_proj.in_features, mlp.down_proj.out_features
    per_neuron = 3 * hidden  # a gate row, an up row and a down column
    neurons = min(width - 1, max(0, round(n_params / (len(blocks) * per_neuron))))
    plan = context_plan(stats, fraction=neurons / width, linear=False, embeddings=False)
    return (context_prune(model, plan, physical=True, progress=progress),
            {"mlp_neurons_removed_per_layer": neurons})


def _width_with_heads(model, windows, n_params, progress):
    """Structured width pruning: about the same share of the attention heads and of the MLP
    neurons of every block, whole heads per key/value group, the MLP neurons making up the
    rest of ``n_params``; heads of least mean write (:func:`shortgpt_lite.heads.head_importance`),
    neurons of least mean |activation|, both read from ``windows`` on the unpruned model."""
    n_heads = heads_for_share(model, n_params / prunable_parameters(model))
    by_heads = n_heads * head_params(model)
    importance = head_importance(model, windows, progress=progress) if n_heads else None
    pruned, info = _mlp_neurons(model, windows, n_params - by_heads, progress)
    if n_heads:
        remove_heads(pruned, n_heads, importance, inplace=True)
    return pruned, {**info, "attention_heads_removed_per_layer": n_heads}


def _sparsity_for(model, n_params: float, method: str) -> float:
    s = n_params / prunable_parameters(model)
    if not 0 <= s < 1:
        raise ValueError(f"{method} would need sparsity {s:.2f} in the block linears to remove "
                         "that many parameters; use a smaller budget.")
    return s


def prune_to_budget(model: nn.Module, method: str, budget: float, *, windows=None,
                    domain_data=None, depth_share: float = 0.5,
                    progress: bool = True) -> tuple[nn.Module, dict]:
    """A pruned copy of ``model`` with about ``budget`` of its parameters removed by
    ``method`` (one of :data:`METHODS`), and a dict saying what was done.

    ``windows`` (calibration tokens) are needed by ``shortgpt``, ``wanda``, ``width`` and
    the combinations; ``domain_data`` (the domain's token windows) by ``context``.
    ``depth_share`` is the share of the budget ``shortgpt+wanda`` spends on removing layers
    (rounded to whole layers; Wanda removes the rest): 0 is Wanda alone, 1 removal alone.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}. Choose from: {', '.join(METHODS)}.")
    if not (0.0 <= budget < 1.0):
        raise ValueError(f"budget is the fraction of parameters to remove, in [0, 1); got "
                         f"{budget}.")
    if not 0.0 <= depth_share <= 1.0:
        raise ValueError(f"depth_share is the share of the budget spent on removing layers, in "
                         f"[0, 1]; got {depth_share}.")
    _check_int8_runs(model, [method])
    total = param_counts(model)[0]
    target = budget * total
    info: dict = {}
    if method in _CALIBRATED and windows is None:
        raise ValueError(f"{method} needs calibration windows: pass windows=token_windows(...).")
    if method == "dense":
        return copy.deepcopy(model), info
    if method == "shortgpt":
        return _shortgpt(model, windows, target, progress)
    if method == "wanda":
        s = _sparsity_for(model, target, method)
        return wanda_prune(model, windows, s, progress=progress), {"sparsity_of_linears": s}
    if method == "wanda-2:4":
        return wanda_prune(model, windows, "2:4", progress=progress), {"sparsity_of_linears": 0.5}
    if method == "magnitude":
        s = _sparsity_for(model, target, method)
        return magnitude_prune(model, s, progress=progress), {"sparsity_of_linears": s}
    if method == "context":
        if domain_data is None:
            raise ValueError("context needs the domain's token windows: pass "
                             "domain_data=domain_windows(tokenizer, 'law').")
        return _mlp_neurons(model, domain_data, target, progress)
    if method == "width":
        return _mlp_neurons(model, windows, target, progress)
    if method == "width+heads":
        return _width_with_heads(model, windows, target, progress)
    if method == "shortgpt+wanda":
        pruned, info = _shortgpt(model, windows, depth_share * target, progress)
        rest = target - (total - param_counts(pruned)[0])
        s = _sparsity_for(pruned, max(0.0, rest), method)
        info["sparsity_of_linears"] = s
        if s == 0:
            return (copy.deepcopy(model) if pruned is model else pruned), info
        return wanda_prune(pruned, windows, s, inplace=pruned is not model,
                           progress=progress), info
    # int8 keeps every parameter: the counts are taken from the float model it came from
    if method == "int8":
        info["float_params"] = list(param_counts(model))
        return quantize_int8(model), info
    pruned, info = _shortgpt(model, windows, target, progress)  # shortgpt+int8
    info["float_params"] = list(param_counts(pruned))
    return quantize_int8(pruned, inplace=pruned is not model), info


# -------------------------------------------------------------------------- measuring


def _measure(model, tokenizer, ppl_windows: dict, tasks, settings, progress) -> dict:
    row: dict = {}
    for corpus, windows in ppl_windows.items():
        ppl = perplexity(model, windows, progress=False, per_window=True)
        row[f"ppl_{corpus}"] = ppl["perplexity"]
        row[f"nll_{corpus}"] = ppl["nll_per_window"].tolist()
    if tasks:
        suite = evaluate_suite(model, tokenizer, tasks, seed=settings["seed"], progress=False)
        for _, r in suite.iterrows():
            row[f"acc_{r['task']}"] = float(r["acc"])
            row[f"acc_{r['task']}_ci_low"] = float(r["acc_ci_low"])
            row[f"acc_{r['task']}_ci_high"] = float(r["acc_ci_high"])
            row[f"acc_{r['task']}_n"] = int(r["n"])
        row["acc_mean"] = float(suite["acc"].mean())
    row["size_bytes"] = serialized_bytes(model)
    return row


def _check_int8_runs(model: nn.Module, methods) -> None:
    """Refuse int8 methods up front on a model they cannot quantize, before any other
    method has been pruned and measured."""
    asked = [m for m in methods if m in _INT8]
    if not asked:
        return
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(f"{', '.join(asked)} need a CPU fp32 model (int8 dynamic quantization runs "
                         f"on the CPU), but this one is {param.dtype} on {param.device}. Leave them "
                         f"out of methods, or load the model with device='cpu', dtype='float32'.")


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)  # atomic: an interrupted write leaves the old file or none


def compare(model: nn.Module, tokenizer, methods: Sequence[str] = tuple(METHODS),
            budget: float = 0.25, *, tasks: Mapping[str, int | None] | None = None,
            corpora: Sequence[str] = DEFAULT_CORPORA, calibration: str = "wikipedia",
            domain: str = "law", calibration_windows: int = 32, seq_len: int = 512,
            ppl_windows: int = 16, cost_seq_len: int = 128, decode_tokens: int = 16,
            repeats: int = 3, seed: int = 0, results_dir=None,
            progress: bool = True) -> pd.DataFrame:
    """Prune copies of ``model`` with each of ``methods`` to remove ``budget`` of its
    parameters, measure every copy the same way, one row per method.

    Calibration uses ``calibration_windows`` windows of ``seq_len`` tokens from the
    calibration half of ``calibration`` (``domain`` for ``context``); perplexity uses up
    to ``ppl_windows`` windows of ``seq_len`` tokens from the evaluation half of each of
    ``corpora``; ``tasks`` is passed to :func:`shortgpt_lite.evaluate.evaluate_suite`
    (``None`` = its default suite, ``{}`` = no benchmarks). The input model is never
    changed.

    Columns: ``method``, ``description``, ``params_total`` (parameters present),
    ``params_kept`` (present and non-zero), ``params_removed`` (fraction of the original
    parameters removed or zeroed), ``sparsity`` (zeros among the parameters present),
    ``ppl_<corpus>`` for each corpus with ``nll_<corpus>``, the list of each window's mean
    NLL (two rows' lists pair window by window in
    :func:`shortgpt_lite.experiments.perplexity_ratio`), ``acc_<task>`` with its 95% Wilson interval
    ``acc_<task>_ci_low`` .. ``acc_<task>_ci_high`` and item count ``acc_<task>_n``,
    ``acc_mean`` (the unweighted mean over tasks), ``size_bytes``
    (safetensors file; ``torch.save`` for int8), ``prefill_seconds`` (a
    ``cost_seq_len``-token prompt at batch 1), ``decode_tokens_per_s``, their spreads and
    ``timing_repeats``, ``prune_seconds`` and ``details`` (what the method did: layers
    removed, sparsity of the linears).

    The speeds come from timing every pruned copy together at the end, interleaved
    (:func:`shortgpt_lite.costs.speed_runs`), so every copy is held in memory until then;
    ``repeats=0`` skips the timing and holds one copy at a time.

    With ``results_dir``, each finished method is written to ``<results_dir>/<method>.json``
    and read back on the next run with the same settings, so an interrupted run resumes; a
    method measured but not yet timed is pruned again for the timing, not measured again.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}. Choose from: {', '.join(METHODS)}.")
    if not methods:
        raise ValueError("No methods given; pass e.g. methods=['dense', 'shortgpt', 'wanda'].")
    if not (0.0 <= budget < 1.0):
        raise ValueError(f"budget is the fraction of parameters to remove, in [0, 1); got "
                         f"{budget}.")
    if "context" in methods and domain not in DOMAINS:
        raise ValueError(f"Unknown domain {domain!r} for context pruning; use one of: "
                         f"{', '.join(DOMAINS)}.")
    bad = [c for c in corpora if c not in CORPORA]
    if bad:
        raise ValueError(f"Unknown corpus {bad[0]!r} in corpora; choose from: "
                         f"{', '.join(CORPORA)}.")
    _check_int8_runs(model, methods)
    if repeats < 0:
        raise ValueError(f"repeats is the number of timed runs per method (0 for none); got "
                         f"{repeats}.")
    max_pos = max_positions(model)
    if repeats and max_pos is not None and cost_seq_len + decode_tokens > max_pos:
        raise ValueError(f"The timing's {cost_seq_len}-token prompt plus {decode_tokens} decoded "
                         f"tokens needs more than the model's {max_pos} positions; use a "
                         "shorter cost_seq_len.")
    tasks = dict(DEFAULT_SUITE if tasks is None else tasks)
    settings = {"budget": budget, "tasks": tasks, "corpora": list(corpora),
                "calibration": calibration, "domain": domain,
                "calibration_windows": calibration_windows, "seq_len": seq_len,
                "ppl_windows": ppl_windows, "cost_seq_len": cost_seq_len,
                "decode_tokens": decode_tokens, "repeats": repeats, "seed": seed,
                "model": getattr(model.config, "_name_or_path", type(model).__name__),
                "model_params": param_counts(model)[0],
                "row_format": 4}  # rows saved in an older format are measured again
    folder = None if results_dir is None else Path(results_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    cache: dict = {}

    def data(name: str):  # tokenised once, and only when a method needs it
        if name not in cache:
            if name == "calibration":
                cache[name] = token_windows(tokenizer, load_text(calibration, "calibration"),
                                            seq_len, calibration_windows)
            elif name == "domain":
                cache[name] = domain_windows(tokenizer, domain, seq_len, calibration_windows)
            else:
                cache[name] = {c: token_windows(tokenizer, load_text(c, "evaluation"), seq_len,
                                                ppl_windows) for c in corpora}
        return cache[name]

    total = settings["model_params"]
    rows, untimed = [], {}
    bar = tqdm(methods, desc="compare", disable=not progress)
    for method in bar:
        bar.set_postfix_str(method)
        path = None if folder is None else folder / f"{method.replace(':', '-')}.json"
        saved = None
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") != json.loads(json.dumps(settings)):
                saved = None
        if saved is not None and (not repeats or "prefill_seconds" in saved["row"]):
            rows.append(saved["row"])
            continue
        t0 = time.perf_counter()
        needs_windows = method in _CALIBRATED
        pruned, info = prune_to_budget(
            model, method, budget, progress=False,
            windows=data("calibration") if needs_windows else None,
            domain_data=data("domain") if method == "context" else None)
        pruned.eval()
        if saved is not None:  # measured before, interrupted before the timing
            row = saved["row"]
        else:
            prune_seconds = time.perf_counter() - t0
            present, kept = info.pop("float_params", None) or param_counts(pruned)
            row = {"method": method, "description": METHODS[method], "params_total": present,
                   "params_kept": kept, "params_removed": 1 - kept / total,
                   "sparsity": 1 - kept / present if present else math.nan}
            row.update(_measure(pruned, tokenizer, data("perplexity"), tasks, settings, progress))
            row["prune_seconds"] = prune_seconds
            row["details"] = json.dumps(info)
            if path is not None:
                _save_json(path, {"settings": settings, "row": row})
        rows.append(row)
        if repeats:
            untimed[method] = pruned
        del pruned
    # Timed together, interleaved, so that no method is favoured by when it ran.
    if untimed:
        speeds = summarise_speeds(speed_runs(untimed, cost_seq_len, decode_tokens, repeats,
                                             seed))
        for row in rows:
            if row["method"] in untimed:
                got = speeds.loc[row["method"]]
                row.update({k: float(v) for k, v in got.items() if k != "timing_repeats"},
                           timing_repeats=int(got["timing_repeats"]))
                if folder is not None:
                    _save_json(folder / f"{row['method'].replace(':', '-')}.json",
                               {"settings": settings, "row": row})
        untimed.clear()
    return pd.DataFrame(rows)
