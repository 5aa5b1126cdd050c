"""Conformance of a pruned model on disk: the failures users of pruning tools report most.

``shortgpt-lite check MODEL_DIR`` runs every check on a saved model and prints a table;
it exits non-zero when one fails. Each check is a function of the reloaded model that
returns ``(passed, detail)``, ``passed=None`` meaning it could not run here:

* **reloads**: plain ``AutoModelForCausalLM.from_pretrained`` loads the folder with no
  missing, unexpected or mis-shaped weights (a config whose ``num_hidden_layers`` or
  ``layer_types`` disagrees with the weights fails here);
* **logits**: the logits equal those of the model before saving: with ``original``, the
  unpruned model with the recorded layers removed again; without, a save-and-reload round
  trip of the folder's own model;
* **per-layer config**: ``num_hidden_layers``, every per-layer list (Gemma-3's
  ``layer_types``) and each attention module's ``layer_idx`` agree with the blocks
  (optipfair#20);
* **KV cache**: greedy generation with the KV cache equals generation without it
  (transformers#30508: blocks deleted without renumbering ``layer_idx``);
* **padding**: a left-padded sequence gets the logits it gets alone;
* **half precision**: Block Influence in fp16 and in bf16 is finite;
* **lm-eval**: lm-evaluation-harness's ``HFLM`` loads the folder and scores a request
  (skipped where lm-eval is not installed).
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pandas as pd
import torch

from .inputs import model_inputs, vocab_rows
from .layers import decoder_layers, text_config

__all__ = ["check_model"]


def _ids(model, rows: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(4, vocab_rows(model) - 1), (rows, length), generator=g)


def _logits(model, ids, mask=None) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(**model_inputs(model, ids, mask)).logits.float().cpu()


def _load(folder, device):
    from transformers import AutoModelForCausalLM

    from .models import quiet_transformers

    with quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True)
    return model.to(device).eval(), info


def check_reloads(folder, device) -> tuple:
    model, info = _load(folder, device)
    problems = {k: v for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        listed = "; ".join(f"{k}: {sorted(map(str, v))[:4]}" for k, v in problems.items())
        return model, (False, f"loads, but the weights disagree with the config ({listed})")
    n = len(decoder_layers(model))
    return model, (True, f"{type(model).__name__}, {n} decoder blocks")


def check_logits(model, folder, original, seed: int) -> tuple:
    from .records import REMOVAL_RECORD
    from .removal import remove_layers

    ids = _ids(model, 2, 12, seed)
    got = _logits(model, ids)
    if original is not None:
        from .models import load_model

        record = getattr(model.config, REMOVAL_RECORD, None) or {}
        removed = record.get("removed_layers")
        if not removed:
            return None, "the config holds no record of removed layers to rebuild from"
        source, _ = load_model(str(original), device=str(got.device), dtype=torch.float32)
        want = _logits(remove_layers(source, removed, inplace=True), ids.to(got.device))
        what = f"the original with layers {removed} removed"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            again, _ = _load(tmp, next(model.parameters()).device)
            want = _logits(again, ids)
        what = "a save-and-reload round trip"
    diff = float((got - want).abs().max())
    return diff <= 1e-4, f"max |Δ logit| {diff:.2g} against {what}"


def check_config_lists(model) -> tuple:
    config = text_config(model)
    n = len(decoder_layers(model))
    problems = []
    if config.num_hidden_layers != n:
        problems.append(f"num_hidden_layers is {config.num_hidden_layers}")
    types = getattr(config, "layer_types", None)
    if types is not None and len(types) != n:
        problems.append(f"layer_types has {len(types)} entries")
    for i, block in enumerate(decoder_layers(model)):
        for module in block.modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and idx != i:
                problems.append(f"block {i} has layer_idx {idx}")
                break
            kind = getattr(module, "attention_type", None)
            if types is not None and isinstance(kind, str) and i < len(types) and kind != types[i]:
                problems.append(f"block {i} runs {kind}, the config says {types[i]}")
                break
    if problems:
        return False, f"{n} blocks, but " + "; ".join(problems[:4])
    return True, f"{n} blocks" + ("; layer_types agree" if types is not None else "")


def check_kv_cache(model, seed: int, new_tokens: int = 8) -> tuple:
    ids = _ids(model, 1, 6, seed).to(next(model.parameters()).device)
    runs = []
    for cache in (True, False):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 use_cache=cache, pad_token_id=0, temperature=None, top_p=None,
                                 top_k=None)
        runs.append(out[0, ids.shape[1]:].tolist())
    if runs[0] != runs[1]:
        return False, f"with the cache {runs[0]}, without {runs[1]}"
    return True, f"{new_tokens} greedy tokens agree"


def check_padding(model, seed: int) -> tuple:
    long, short = _ids(model, 1, 10, seed), _ids(model, 1, 6, seed + 1)
    alone = _logits(model, short)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=long.dtype), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    padded = _logits(model, ids, mask)[1:, 4:]
    diff = float((padded - alone).abs().max())
    return diff <= 1e-3, f"max |Δ logit| {diff:.2g} for a sequence left-padded by 4"


def check_half_precision(model, seed: int) -> tuple:
    from .hooks import block_influence

    ids = _ids(model, 2, 16, seed)
    found = []
    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(model).to(dtype)
        bi = block_influence(half, ids, progress=False)
        bad = [i for i, v in enumerate(bi.tolist()) if not math.isfinite(v)]
        found.append(f"{str(dtype).removeprefix('torch.')}: "
                     + (f"NaN or inf at blocks {bad}" if bad else "finite"))
        del half
        if bad:
            return False, "; ".join(found)
    return True, "; ".join(found)


def check_lm_eval(folder, device) -> tuple:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None, "lm-eval is not installed (pip install lm-eval)"
    if not any(Path(folder).glob("tokenizer*")):
        return None, "the folder has no tokenizer for lm-eval to load"
    lm = HFLM(pretrained=str(folder), device=str(device), batch_size=1, dtype="float32")
    request = Instance(request_type="loglikelihood", doc={}, idx=0,
                       arguments=("The capital of France is", " Paris"))
    (loglikelihood, _), = lm.loglikelihood([request])
    return math.isfinite(loglikelihood), f"HFLM scores a request: log p = {loglikelihood:.3g}"


def check_model(folder, *, original=None, device="cpu", seed: int = 0) -> pd.DataFrame:
    """Every check on the model saved in ``folder``; one row per check with ``check``,
    ``passed`` (True, False, or None where it could not run) and ``detail``. ``original``
    (the unpruned model's folder, hub id or bundled name) makes the logits check rebuild
    the pruned model from it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: pass a folder written by "
                         "save_pretrained.")
    rows = []

    def add(name, result):
        passed, detail = result
        rows.append({"check": name, "passed": passed, "detail": detail})

    try:
        model, result = check_reloads(folder, device)
    except Exception as error:  # the folder does not load: nothing else can run
        add("reloads with plain transformers", (False, f"{type(error).__name__}: {error}"))
        return pd.DataFrame(rows)
    add("reloads with plain transformers", result)
    steps = [("logits equal those before saving", lambda: check_logits(model, folder, original, seed)),
             ("per-layer config agrees with the blocks", lambda: check_config_lists(model)),
             ("KV-cache generation equals no-cache", lambda: check_kv_cache(model, seed)),
             ("logits invariant to padding", lambda: check_padding(model, seed)),
             ("Block Influence finite in fp16 and bf16", lambda: check_half_precision(model, seed)),
             ("lm-evaluation-harness HFLM scores it", lambda: check_lm_eval(folder, device))]
    for name, step in steps:
        try:
            add(name, step())
        except Exception as error:
            add(name, (False, f"{type(error).__name__}: {error}"))
    return pd.DataFrame(rows)
