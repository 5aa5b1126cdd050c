"""Healing after layer removal: train the pruned model briefly to win back what it lost.

:func:`heal` returns a plain transformers model of the pruned model's size, trained on
calibration windows by one of three recipes (``method``):

* ``"lora"``: low-rank adapters (Hu et al. 2021, arXiv 2106.09685, through peft) on
  every linear layer of the decoder blocks, trained with the language-modelling loss and
  merged back into the weights. Gromov et al. (2024, arXiv 2403.17887) heal this way
  after removing a run of layers; Shortened LLaMA (Kim et al. 2024, arXiv 2402.02834) too.
* ``"distill"`` and ``"distill+lora"``: distillation from the unpruned model, the
  teacher (Hinton et al. 2015, arXiv 1503.02531). With teacher logits :math:`z^T_t` and
  student logits :math:`z^S_t` at every position :math:`t` and temperature :math:`\\tau`,

  .. math:: \\mathcal{L} = \\tau^2 \\, \\frac1{|t|}\\sum_t
            \\mathrm{KL}\\big(\\mathrm{softmax}(z^T_t/\\tau) \\,\\|\\,
            \\mathrm{softmax}(z^S_t/\\tau)\\big)

  ``distill`` trains the decoder blocks' own weights; ``distill+lora`` trains LoRA
  adapters instead. The teacher runs beside the student, one batch at a time, so its
  full-vocabulary logits are never stored. Embeddings, the final norm and the LM head
  stay frozen: SmolLM2 and Gemma tie the head to the input embeddings, so training one
  would move the other.
* ``"bridge"``: local bridging of each gap, after LLM-Streamline (Chen et al. 2024,
  arXiv 2403.19135), which trains a light layer to stand in for a run of removed
  blocks. Here the stand-in is the kept block next to the run (the one before it; the
  one after it for a run that starts at block 0). With :math:`h^T_i` the teacher's
  hidden state entering its block :math:`i`, the kept block :math:`f_j` that now spans
  teacher blocks :math:`s_j .. e_j` (itself and the run) learns

  .. math:: \\mathcal{L}_j = \\frac1{|t|\\,d}\\sum_t
            \\big\\| f_j(h^T_{s_j}) - h^T_{e_j+1} \\big\\|^2

  from teacher states computed once and cached. Only the bridging blocks run in a step,
  so it is the cheapest recipe, and it works alike for ShortGPT's scattered plans and
  for one contiguous run (Gromov et al.). Unlike LLM-Streamline it adds no layer: the
  healed model is exactly as large as the pruned one.

A model with zeroed weights (Wanda or magnitude pruning, ``config.shortgpt_lite_sparsity``)
keeps them: every block weight that is zero before healing is zero after it. Trained
weights are masked after each step; LoRA's update :math:`BA` is masked when it is merged,
to the weight's own pattern, which is what lets the merged model stay sparse (Wanda's own
code instead keeps the dense adapters unmerged beside the sparse weights).

Training uses only the windows it is given (calibration text: evaluate on held-out
text). The budget is ``steps`` optimizer steps or ``minutes`` of wall-clock time,
teacher passes included. For a fixed ``seed`` (and ``steps``) the result is the same on
the same machine. The healed model's config keeps the pruning record and gains
``config.shortgpt_lite_healing``: method, steps, tokens, teacher and settings.
"""

from __future__ import annotations

import copy
import time
import warnings
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import check_windows
from .evaluate import token_nll
from .inputs import input_device, vocab_rows
from .layers import decoder_layers, unwrap_model
from .records import HEALING_RECORD, REMOVAL_RECORD, SPARSITY_RECORD

__all__ = ["METHODS", "bridge_segments", "distillation_loss", "heal", "healing_record", "lm_loss"]

METHODS = ("lora", "distill", "distill+lora", "bridge")
_LR = {"lora": 2e-4, "distill": 2e-5, "distill+lora": 2e-4, "bridge": 1e-3}
_HINT = "token_windows(tokenizer, load_text('wikipedia', 'calibration'), 256)"


def healing_record(model: nn.Module) -> dict | None:
    """How ``model`` was healed (``config.shortgpt_lite_healing``), or ``None``."""
    record = getattr(unwrap_model(model).config, HEALING_RECORD, None)
    return dict(record) if record else None


def bridge_segments(removed: list[int], n: int) -> dict[int, tuple[int, int]]:
    """``{kept block j: (s_j, e_j)}``: the teacher blocks each bridging block stands for,
    for a model of ``n`` blocks with ``removed`` taken out (original numbering). Each
    maximal run of removed blocks joins the kept block before it, or the one after it
    when the run starts at block 0. Kept blocks next to no run are left out."""
    removed = sorted(set(removed))
    if not removed or len(removed) >= n:
        raise ValueError(f"Nothing to bridge: {len(removed)} of {n} layers removed.")
    runs, start = [], removed[0]
    for prev, cur in zip(removed, removed[1:] + [None]):
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
    span: dict[int, list[int]] = {}
    for a, b in runs:
        j = a - 1 if a > 0 else b + 1
        s, e = span.get(j, [j, j])
        span[j] = [min(s, a), max(e, b)]
    return {j: (s, e) for j, (s, e) in sorted(span.items())}


# ------------------------------------------------------------------------ the checks


def _check_budget(steps, minutes) -> None:
    if steps is None and minutes is None:
        raise ValueError("Give heal a budget: steps=N optimizer steps or minutes=M of "
                         "wall-clock time.")
    if steps is not None and minutes is not None:
        raise ValueError("Give heal one budget, steps or minutes, not both.")
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}; "
                         "with no steps there is nothing to heal.")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be more than 0, got {minutes!r}; "
                         "with no time there is nothing to heal.")


def _check_teacher(model, teacher, method) -> None:
    if teacher is None:
        if method != "lora":
            raise ValueError(f"method={method!r} learns from the unpruned model: pass it as "
                             "teacher= (the model the layers were removed from).")
        return
    if vocab_rows(teacher) != vocab_rows(model):
        raise ValueError(f"The teacher has a vocabulary of {vocab_rows(teacher)} tokens and the "
                         f"model {vocab_rows(model)}: distillation compares their next-token "
                         "distributions token by token, so both must use the same tokenizer. "
                         "Pass the model the layers were removed from.")


def _removed_layers(model, teacher) -> list[int]:
    record = getattr(unwrap_model(model).config, REMOVAL_RECORD, None) or {}
    removed = record.get("removed_layers")
    if not removed:
        raise ValueError("method='bridge' needs to know which layers were removed, from the "
                         "record remove_layers writes into the config (config.shortgpt_lite); "
                         "this model has none. Prune it with remove_layers or "
                         "`shortgpt-lite prune`.")
    n = len(decoder_layers(teacher))
    if record.get("original_num_hidden_layers") != n or \
            len(decoder_layers(model)) != n - len(removed):
        raise ValueError(f"The teacher has {n} layers, but this model was pruned from one of "
                         f"{record.get('original_num_hidden_layers')}; pass the model the "
                         "layers were removed from as teacher.")
    return list(removed)


# ---------------------------------------------------------------------- the batches


def _batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Window indices in fixed batches, from one seeded shuffle."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.split(batch_size))


def _schedule(n_batches: int, seed: int):
    """Batch numbers forever: each epoch visits every batch once, in a seeded order."""
    generator = torch.Generator().manual_seed(seed + 1)
    while True:
        yield from torch.randperm(n_batches, generator=generator).tolist()


# ---------------------------------------------------------------------- the losses


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def lm_loss(model, ids) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on the windows ``ids``."""
    logits = _logits(model, ids)
    return token_nll(logits[:, :-1], ids[:, 1:].to(logits.device)).mean()


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """:math:`\\tau^2` times the mean over positions of KL(teacher ‖ student) at
    temperature :math:`\\tau` (Hinton et al. 2015)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


# -------------------------------------------------------------------- the trainables


def _lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules="all-linear", bias="none")
    with warnings.catch_warnings():  # peft asks transformers a question v5 renamed
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        return get_peft_model(model, config)


def _freeze_all_but(model, modules) -> list[nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for m in modules for p in m.parameters()]
    for p in trained:
        p.requires_grad_(True)
    return trained


def _zero_masks(model) -> dict[str, torch.Tensor]:
    """``{parameter name: where it is not zero}`` for the block weights of a model with a
    sparsity record; empty for any other model."""
    if not getattr(unwrap_model(model).config, SPARSITY_RECORD, None):
        return {}
    blocks = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    return {name: p != 0 for name, p in model.named_parameters()
            if id(p) in blocks and p.dim() == 2}


@torch.no_grad()
def _apply_masks(model, masks) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        params[name].mul_(keep)


def _merged(model, masks):
    """The LoRA model as a plain one, its adapters merged, the zeros of ``masks`` kept."""
    model = model.merge_and_unload()
    _apply_masks(model, masks)
    return model


# ------------------------------------------------------------------- bridge states


def _block_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _teacher_states(teacher, windows, batches, segments, progress: bool):
    """Per batch: for each bridging block ``j``, the teacher's state entering block
    ``s_j``, its state leaving block ``e_j``, and the call arguments block ``j``
    received (masks and rotary embeddings of that block's attention type)."""
    blocks = decoder_layers(teacher)
    device = input_device(teacher)
    got: dict = {}

    def before(i):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            got[("in", i)] = x.detach().clone()
            got[("call", i)] = (args[1:], {k: v for k, v in kwargs.items()
                                           if k != "hidden_states"})
        return hook

    def after(i):
        def hook(_module, _args, out):
            got[("out", i)] = _block_out(out).detach().clone()
        return hook

    states = []
    with ExitStack() as stack, torch.no_grad():
        for i in {s for s, _ in segments.values()} | set(segments):
            stack.callback(blocks[i].register_forward_pre_hook(before(i), with_kwargs=True).remove)
        for i in {e for _, e in segments.values()}:
            stack.callback(blocks[i].register_forward_hook(after(i)).remove)
        for batch in tqdm(batches, desc="teacher states", leave=False, disable=not progress):
            got.clear()
            teacher(input_ids=windows[batch].to(device), use_cache=False)
            states.append({j: (got[("in", s)], got[("out", e)], got[("call", j)])
                           for j, (s, e) in segments.items()})
    return states


def _bridge_loss(student_blocks, batch_states) -> torch.Tensor:
    losses = []
    for j, (x, target, (args, kwargs)) in batch_states.items():
        out = _block_out(student_blocks[j](x, *args, **kwargs))
        losses.append(F.mse_loss(out.float(), target.float()))
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------- heal


def heal(pruned: nn.Module, windows: torch.Tensor, teacher: nn.Module | None = None,
         method: str = "lora", *, steps: int | None = None, minutes: float | None = None,
         seed: int = 0, lr: float | None = None, rank: int = 16, batch_size: int = 4,
         temperature: float = 1.0, teacher_name: str | None = None,
         every: int | None = None, on_checkpoint=None, progress: bool = True) -> nn.Module:
    """Train a copy of ``pruned`` on ``windows`` (``[n, seq_len]`` calibration tokens)
    by ``method`` (see the module docstring) and return it as a plain model.

    ``teacher`` is the model the layers were removed from; ``"distill"``,
    ``"distill+lora"`` and ``"bridge"`` need it. The budget is ``steps`` optimizer steps
    (AdamW, ``lr``, default per method) of ``batch_size`` windows, or ``minutes`` of
    wall-clock time. ``rank`` is the LoRA rank (alpha = 2 x rank). ``pruned`` and
    ``teacher`` are left unchanged. The record in ``config.shortgpt_lite_healing`` holds
    the method, the steps and tokens trained, the seconds taken, the first and last
    batch loss, the teacher (``teacher_name``, else its ``name_or_path``) and the
    settings; for ``bridge`` also which teacher blocks each bridging block stands for.

    ``on_checkpoint(model, steps, seconds, loss)`` is called after every ``every`` steps
    with the model as it stands, in eval mode: a recovery curve measures it there. LoRA
    adapters are not yet merged, except for a sparse model, whose callback gets a merged
    copy with its zeros kept. Its own time counts neither towards ``seconds`` nor the budget.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown healing method {method!r}. Choose one of: "
                         f"{', '.join(METHODS)}.")
    _check_budget(steps, minutes)
    check_windows(windows, _HINT)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    _check_teacher(pruned, teacher, method)
    lr = _LR[method] if lr is None else lr
    t0 = time.perf_counter()

    torch.manual_seed(seed)
    model = copy.deepcopy(unwrap_model(pruned))
    device = input_device(model)
    batches = _batches(len(windows), batch_size, seed)
    segments, masks = None, _zero_masks(model)
    if method == "bridge":
        removed, n = _removed_layers(model, teacher), len(decoder_layers(teacher))
        segments = bridge_segments(removed, n)
        kept = [i for i in range(n) if i not in removed]
        student_blocks = {j: decoder_layers(model)[kept.index(j)] for j in segments}
        trained = _freeze_all_but(model, student_blocks.values())
        states = _teacher_states(teacher, windows, batches, segments, progress)
    elif method in ("lora", "distill+lora"):
        for p in model.parameters():
            p.requires_grad_(False)
        model = _lora(model, rank)
        trained = [p for p in model.parameters() if p.requires_grad]
    else:
        trained = _freeze_all_but(model, decoder_layers(model))
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    if teacher is not None:
        teacher_training = unwrap_model(teacher).training
        unwrap_model(teacher).eval()

    # Logits of a few windows at a time (about 0.5 GiB in fp32), their gradients summed:
    # Gemma's 262k-token vocabulary would otherwise need gigabytes per step.
    chunk = max(1, 2**27 // (windows.shape[1] * vocab_rows(model)))

    def chunk_loss(ids) -> torch.Tensor:
        if method == "lora":
            return lm_loss(model, ids)
        with torch.no_grad():
            target = _logits(teacher, ids)
        return distillation_loss(_logits(model, ids), target, temperature)

    def backward(batch_no: int) -> float:
        """The batch's mean loss, its gradient accumulated into the trained weights."""
        if method == "bridge":
            loss = _bridge_loss(student_blocks, states[batch_no])
            loss.backward()
            return float(loss.detach())
        batch, total = batches[batch_no], 0.0
        for part in batch.split(chunk):
            loss = chunk_loss(windows[part].to(device)) * (len(part) / len(batch))
            loss.backward()
            total += float(loss.detach())
        return total

    model.train()
    losses, done, tokens = [], 0, 0
    bar = tqdm(total=steps, desc=f"healing ({method})", unit="step", disable=not progress)
    for batch_no in _schedule(len(batches), seed):  # at least one step, then the budget
        optimizer.zero_grad(set_to_none=True)
        losses.append(backward(batch_no))
        optimizer.step()
        if masks and method not in ("lora", "distill+lora"):
            _apply_masks(model, masks)
        done += 1
        tokens += int(batches[batch_no].numel() * windows.shape[1])
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_checkpoint is not None and every and done % every == 0:
            paused = time.perf_counter()
            model.eval()
            view = _merged(copy.deepcopy(model), masks) if masks and \
                method in ("lora", "distill+lora") else model
            on_checkpoint(view, done, paused - t0, losses[-1])
            del view
            model.train()
            t0 += time.perf_counter() - paused  # the checkpoint's time is not healing's
        if done == steps or (minutes is not None and time.perf_counter() - t0 >= 60 * minutes):
            break
    bar.close()
    if teacher is not None:
        unwrap_model(teacher).train(teacher_training)

    if method in ("lora", "distill+lora"):
        model = _merged(model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    config = model.config
    record = {"method": method, "steps": done, "tokens": tokens,
              "seconds": round(time.perf_counter() - t0, 2),
              "teacher": None if method == "lora" else
              (teacher_name or getattr(unwrap_model(teacher).config, "name_or_path", None) or None),
              "lr": lr, "batch_size": batch_size, "seq_len": int(windows.shape[1]),
              "windows": int(windows.shape[0]), "seed": seed,
              "first_loss": losses[0], "last_loss": losses[-1]}
    if method in ("lora", "distill+lora"):
        record["lora_rank"] = rank
    if method.startswith("distill"):
        record["temperature"] = temperature
    if masks:
        record["zeros_kept"] = True
    if segments is not None:
        record["bridges"] = {str(j): list(se) for j, se in segments.items()}
    earlier = getattr(config, HEALING_RECORD, None)
    if earlier:
        record["earlier"] = [dict(earlier)]
    setattr(config, HEALING_RECORD, record)
    return model
