"""Measurements of quality: perplexity, zero-shot multiple choice and generation samples.

Every number in the book comes from one of these functions, so each one pins down what
it measures:

* ``perplexity`` / ``text_perplexity``: fixed-length, non-overlapping token windows;
  the sequence length is part of the result, because a perplexity without it cannot be
  compared (Llama-2-7B on WikiText: 5.47 at 2048 tokens, 5.12 at 4096). Each model is
  measured on windows cut by *its own* tokenizer, so perplexities of models with
  different vocabularies are per-token figures of different token streams.
* ``evaluate_choices`` / ``evaluate_suite``: zero-shot multiple choice scored by
  log-likelihood, with ``acc`` and ``acc_norm`` as lm-evaluation-harness (Gao et al.,
  2023) defines them, so the figures can be set next to published ones.
* ``decoded_accuracy``: LAMBADA's last word, read as a prompt and then decoded token by
  token with a KV cache, the way generation runs; the probe for ShortGPT-gen, whose
  prefill and decoding run different layers.
* ``generation_samples``: greedy continuations of fixed prompts. ShortGPT (Men et al.,
  2024, Section 4) reports that generative tasks collapse after layer removal (XSum
  19.4 -> 0.67 on Llama-2-7B); these samples let a chapter show it.
* ``bootstrap_interval`` and ``binomial_ci``: the 95% intervals every comparison in the
  book stands on, over evaluation windows and over benchmark items.

What a model costs to store and run is measured in :mod:`shortgpt_lite.costs`. Results
are plain dicts or pandas DataFrames that seaborn plots directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .costs import synchronize
from .data import Item, adds_bos, load_benchmark, load_text, token_windows
from .inputs import cache_keyword, check_token_ids, input_device, max_positions, vocab_rows
from .layers import replaced_forward, text_config, unwrap_model

__all__ = [
    "DEFAULT_SUITE",
    "GENERATION_PROMPTS",
    "binomial_ci",
    "bootstrap_interval",
    "decoded_accuracy",
    "evaluate_choices",
    "evaluate_suite",
    "generation_samples",
    "loglikelihoods",
    "perplexity",
    "plan_batches",
    "score_items",
    "text_perplexity",
    "token_nll",
]

# The zero-shot suite every chapter reports: 200 seeded items per task.
DEFAULT_SUITE: dict[str, int] = {"mmlu": 200, "piqa": 200, "hellaswag": 200, "arc_easy": 200,
                                 "boolq": 200, "winogrande": 200}

# Fixed prompts for generation_samples: a fact, a story, a procedure, a news lead to
# summarise (XSum-like) and code, so each kind of damage has somewhere to show.
GENERATION_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a cup of tea, first",
    ("The city council voted on Tuesday to close the old bridge to cars after engineers "
     "found cracks in its supports. In one sentence, the news is that"),
    "def fibonacci(n):\n",
)

# lm-evaluation-harness reports acc_norm only where the task's metric_list asks for it.
# These tasks report acc alone (MMLU's letters all have length 1, so it would equal acc;
# Winogrande's "choices" there are the option-filled prefixes, not the options).
_NO_ACC_NORM = ("boolq", "winogrande", "lambada", "mmlu")

_Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


# ----------------------------------------------------------------------------- helpers


def _check_tokenizer(model, tokenizer) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding matrix.

    A tokenizer with more entries than the embedding has rows would index past it. One
    with far fewer (under 80%) is another model's tokenizer: real models pad their
    embedding by at most a few percent (Qwen2.5: 151,936 rows for 151,665 tokens).
    """
    rows, n = vocab_rows(model), len(tokenizer)
    if n > rows or n < 0.8 * rows:
        raise ValueError(
            f"The tokenizer has {n:,} tokens but the model's embedding has {rows:,} rows: they "
            "belong to different models. Use the tokenizer that load_model returned together "
            "with this model.")


def binomial_ci(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% for the default ``z``).

    With :math:`\\hat p = k/n`,

    .. math:: \\frac{\\hat p + z^2/2n \\pm z\\sqrt{\\hat p(1-\\hat p)/n + z^2/4n^2}}{1 + z^2/n}

    (Wilson, 1927). Unlike the normal approximation it stays inside [0, 1] and keeps
    its coverage near 0% and 100% accuracy. With 200 items and accuracy near 50% the
    interval is about ±7 points wide, so a 3-point difference between two models is noise.
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values, *, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """A percentile-bootstrap interval (95% by default) of the mean of ``values``.

    Draws ``n_boot`` resamples of ``values`` with replacement and returns the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means (Efron and
    Tibshirani, 1993). ``values`` are one number per evaluation window, so the interval
    says how much the mean would move on other text like this, not how uncertain the
    model is. The draws depend only on ``seed`` and ``len(values)``, so two arrays of the
    same length are resampled with the same windows: pass the per-window *differences*
    of two models to get a paired interval. NaN for fewer than two values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be one number per window, a 1-D array; got shape "
                         f"{values.shape}.")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must be in (0, 1) and n_boot at least 1; got {level}, {n_boot}.")
    if len(values) < 2:
        return (math.nan, math.nan)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values[draws].mean(axis=1), [tail, 100 - tail])
    return (float(low), float(high))


def _mean_stderr(values: np.ndarray) -> float:
    # lm-evaluation-harness's stderr of a mean: sample standard deviation / sqrt(n)
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


# -------------------------------------------------------------------------- perplexity


def _default_ppl_batch(model, seq_len: int) -> int:
    # The logits of one batch are [batch, seq_len, vocab]; keep them near 1 GiB in fp32.
    return max(1, min(16, 2**28 // (seq_len * vocab_rows(model))))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log p(target) = logsumexp(logits) - logits[target]`` per position, in fp32.

    One sequence at a time, so a bf16 model never needs an fp32 copy of the whole
    ``[batch, seq, vocab]`` logits. ``cross_entropy`` fuses the log-softmax and the pick
    of the target: on a CPU it runs in 0.6x the time of ``logsumexp`` and ``gather``.
    """
    return torch.stack([F.cross_entropy(row.float(), tgt, reduction="none")
                        for row, tgt in zip(logits, targets)])


def perplexity(model, windows: torch.Tensor, batch_size: int | None = None,
               progress: bool = True, *, per_window: bool = False) -> dict:
    """Perplexity of ``model`` over fixed-length, non-overlapping token ``windows``.

    ``windows`` is the ``[n, seq_len]`` LongTensor from ``token_windows``. Within each
    window every token after the first is predicted from the ones before it, so

    .. math:: \\mathrm{PPL} = \\exp\\Big(-\\frac{1}{n(T-1)} \\sum_{w=1}^{n}
              \\sum_{t=2}^{T} \\log p_\\theta(x^w_t \\mid x^w_{<t})\\Big)

    with :math:`T` = ``seq_len``. Windows do not overlap and do not see each other, so
    early tokens of each window have little context; that is why the sequence length
    is part of the result. ``batch_size=None`` picks one that keeps the logits near
    1 GiB.

    Returns a dict: ``perplexity``, ``nll`` (mean nats per predicted token), ``seq_len``,
    ``windows``, ``tokens`` (predicted tokens), ``batch_size``, ``seconds`` and
    ``tokens_per_s`` (input tokens per second). With ``per_window=True`` it also holds
    ``nll_per_window``, a float64 array of each window's mean NLL (their mean is ``nll``),
    which :func:`bootstrap_interval` resamples.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a 2-D LongTensor [n, seq_len]; build it with "
                         "token_windows(tokenizer, text, seq_len).")
    n, seq_len = windows.shape
    if n == 0 or seq_len < 2:
        raise ValueError(f"windows has shape {tuple(windows.shape)}; it needs at least one window "
                         "of at least 2 tokens.")
    max_pos = max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"The windows are {seq_len} tokens long but the model has only "
                         f"{max_pos} positions; cut them with token_windows(..., seq_len={max_pos}) "
                         "or shorter.")
    check_token_ids(model, windows)
    batch_size = batch_size or _default_ppl_batch(model, seq_len)
    device = input_device(model)
    window_sums = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc=f"perplexity @ {seq_len}",
                          disable=not progress):
            x = windows[start:start + batch_size].to(device)
            logits = model(x, use_cache=False).logits
            window_sums.append(token_nll(logits[:, :-1], x[:, 1:]).double().sum(dim=1).cpu())
    synchronize(device)
    seconds = time.perf_counter() - t0
    sums = torch.cat(window_sums).numpy()
    nll = float(sums.sum()) / (n * (seq_len - 1))
    result = {"perplexity": math.exp(nll), "nll": nll, "seq_len": int(seq_len), "windows": int(n),
              "tokens": n * (seq_len - 1), "batch_size": batch_size, "seconds": seconds,
              "tokens_per_s": n * seq_len / seconds}
    if per_window:
        result["nll_per_window"] = sums / (seq_len - 1)
    return result


def text_perplexity(model, tokenizer, corpus: str = "wikipedia", split: str = "evaluation",
                    seq_len: int = 512, max_windows: int | None = None,
                    batch_size: int | None = None, progress: bool = True) -> dict:
    """``perplexity`` on a corpus from ``load_text``, cut into windows by the model's own
    tokenizer.

    Returns ``perplexity``'s dict plus ``corpus``, ``split`` and ``tokenizer`` (its name),
    because a perplexity is a figure of one token stream at one sequence length.
    """
    _check_tokenizer(model, tokenizer)
    max_pos = max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {max_pos} positions; "
                         f"use seq_len <= {max_pos}.")
    windows = token_windows(tokenizer, load_text(corpus, split), seq_len, max_windows)
    result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return {"corpus": corpus, "split": split,
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__), **result}


# ----------------------------------------------------------- log-likelihood of requests


def _encode_requests(tokenizer, requests) -> list[tuple[list[int], list[int]]]:
    """Token ids ``(context, continuation)`` per request, the way lm-evaluation-harness
    encodes a pair.

    Trailing whitespace of the context moves to the front of the continuation; the
    continuation's tokens are ``tok(context + continuation)[len(tok(context)):]``, so
    they are the tokens the model sees when the two are read as one text. No BOS is
    added unless the tokenizer adds one. An empty context becomes the BOS token (EOS if
    there is none), as lm-evaluation-harness does.
    """
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    pairs = []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        pairs.append((context, continuation))
    texts = list(dict.fromkeys(t for c, k in pairs for t in ((c, c + k) if c else (k,))))
    ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    encoded = []
    for context, continuation in pairs:
        if not context:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
                else tokenizer.eos_token_id
            encoded.append(([start], list(ids[continuation])))
            continue
        ctx = prefix + list(ids[context])
        whole = prefix + list(ids[context + continuation])
        encoded.append((ctx, whole[len(ctx):]))
    return encoded


class Batch(NamedTuple):
    """One model call of :func:`plan_batches`.

    ``rows[r]`` is ``(scored, members)``: the row's last ``scored`` positions carry the
    logits it needs (``keep`` is the largest), and ``members`` lists
    ``(request index, continuation ids, offset)``, where the continuation's first token
    is predicted at the first scored position (the context's last token) and token
    ``j >= 1`` at scored position ``offset + j``. ``attention_mask`` is 2-D (padding
    only), 4-D (additive, for rows holding several continuations) or None.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    keep: int
    rows: list
    tokens: int


def _packs_rows(model) -> bool:
    """Whether a packed row scores as its requests would alone: not with ALiBi (Falcon,
    BLOOM, MPT), whose position bias is built from a 2-D mask rather than position ids."""
    config = text_config(model)
    return not (getattr(config, "alibi", False) or config.model_type in ("bloom", "mpt"))


def _block_mask(segments: list[torch.Tensor], width: int, dtype) -> torch.Tensor:
    """Additive ``[rows, 1, width, width]`` mask for left-padded packed rows. ``segments[r]``
    numbers each real token of row ``r``: 0 for the shared context, ``s`` for the tokens
    of its ``s``-th continuation. A token sees the context and the earlier tokens of its
    own continuation; a padding position sees only itself."""
    allowed = torch.zeros((len(segments), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, seg in enumerate(segments):
        pad = width - len(seg)
        q, k = seg[:, None], seg[None, :]
        allowed[r, pad:, pad:] = causal[:len(seg), :len(seg)] & ((k == 0) | (k == q))
        allowed[r, range(pad), range(pad)] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def plan_batches(model, tokenizer, requests, batch_size: int,
                 share_context: bool = True) -> list[Batch]:
    """Group requests into left-padded batches of model inputs.

    A request's input is ``(context + continuation)[:-1]``: the context's last position
    predicts the first continuation token, and the continuation's tokens the rest. With
    ``share_context`` (the default), the requests that share a context at least as long
    as their longest continuation, such as the choices of one HellaSwag or ARC item,
    share one row: the context once, then each continuation but its last token, packed
    one after another. A 4-D attention mask lets each continuation see the context and
    itself, never another continuation, and its position ids restart where the context
    ends, so every score equals the one its own row would give, up to rounding; the row
    costs ``|context| + Σ(|continuation| - 1)`` tokens instead of
    ``Σ(|context| + |continuation| - 1)``. One-token answers with the same context
    (MMLU's letters, BoolQ's yes/no) always share a row.

    Rows are sorted longest first, so each batch holds similar lengths and little
    padding, and an out-of-memory error shows up in the first batch. Inputs longer than
    the model's positions lose tokens from the left, as in lm-evaluation-harness, and
    keep a row of their own, as does every request when ``share_context`` is False, when
    a sliding window is shorter than the request, or when the model's positions come
    from ALiBi.
    """
    max_pos = max_positions(model)
    window = getattr(text_config(model), "sliding_window", None)
    share_context = share_context and _packs_rows(model)
    encoded = []
    for i, (ctx, cont) in enumerate(_encode_requests(tokenizer, requests)):
        if not cont:
            raise ValueError(f"Request {i} has an empty continuation {requests[i][1]!r}; every "
                             "choice needs at least one token to score.")
        if max_pos is not None and len(cont) > max_pos:
            raise ValueError(f"Request {i}'s continuation is {len(cont)} tokens, more than the "
                             f"model's {max_pos} positions.")
        whole = ctx + cont
        if max_pos is not None and len(whole) - 1 > max_pos:
            ctx, shared = whole[-(max_pos + 1):-len(cont)], False
        else:  # a sliding window must cover the whole request for its mask to stay exact
            shared = share_context and (window is None or len(whole) - 1 <= window)
        encoded.append((i, ctx, cont, shared))
    # Packing pays where the context is at least as long as the longest continuation
    # (HellaSwag, ARC); with a short context (PIQA) the longer, unevenly padded rows cost
    # more than the context saved.
    longest: dict[tuple, int] = {}
    for _, ctx, cont, shared in encoded:
        if shared:
            longest[tuple(ctx)] = max(longest.get(tuple(ctx), 0), len(cont))
    groups: dict[tuple, tuple[list[int], dict[tuple, int], list]] = {}
    for i, ctx, cont, shared in encoded:
        segment = tuple(cont[:-1])
        packed = shared and len(ctx) >= longest[tuple(ctx)]
        key = (tuple(ctx),) if packed else (tuple(ctx), segment)
        _, offsets, members = groups.setdefault(key, (ctx, {}, []))
        if segment and segment not in offsets:
            offsets[segment] = sum(map(len, offsets))
        members.append((i, cont, offsets.get(segment, 0)))
    rows = [(list(ctx) + [t for s in offsets for t in s], len(ctx), offsets, members)
            for ctx, offsets, members in groups.values()]
    rows.sort(key=lambda r: len(r[0]), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dtype = getattr(model, "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = len(chunk[0][0])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        real = torch.zeros((len(chunk), width), dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        segments = []
        for r, (tokens, n_ctx, offsets, _) in enumerate(chunk):
            ids[r, width - len(tokens):] = torch.tensor(tokens)
            real[r, width - len(tokens):] = 1
            seg = torch.zeros(len(tokens), dtype=torch.long)
            pos = torch.arange(len(tokens))
            at = n_ctx
            for s, segment in enumerate(offsets, start=1):
                seg[at:at + len(segment)] = s
                pos[at:at + len(segment)] = torch.arange(n_ctx, n_ctx + len(segment))
                at += len(segment)
            positions[r, width - len(tokens):] = pos
            segments.append(seg)
        scored = [(1 + sum(map(len, offsets)), members) for _, _, offsets, members in chunk]
        keep = max(n for n, _ in scored)
        if any(len(offsets) > 1 for _, _, offsets, _ in chunk):
            mask = _block_mask(segments, width, dtype)
        elif bool(real.all()):
            mask = positions = None  # no padding: the plain causal path
        else:
            mask = real  # left padding: position ids restart at 0 on each row's first token
        batches.append(Batch(ids, mask, positions, keep, scored, int(real.sum())))
    return batches


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   progress: bool = True, share_context: bool = True,
                   head_at_scored: bool = True) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)``.

    The score is the sum of the continuation tokens' log-probabilities,

    .. math:: \\log p(y \\mid x) = \\sum_{j=1}^{k} \\log p_\\theta(y_j \\mid x, y_{<j}),

    and ``is_greedy`` says whether every :math:`y_j` is the argmax, as in
    lm-evaluation-harness's ``loglikelihood``. Batches are left-padded with an attention
    mask and position ids that start at each row's first real token, so padding does not
    change a score. Requests that share a context share one row (see
    :func:`plan_batches`; ``share_context=False`` gives each its own). The output head
    runs only on the positions each row scores (``head_at_scored=False``: on as many final
    positions of every row as the row that scores the most, which the eval benchmark
    times against it), and log-softmax runs in fp32 over those positions alone.
    """
    return _loglikelihoods(model, tokenizer, requests, batch_size, progress, share_context,
                           head_at_scored)[0]


@contextmanager
def _head_at(model, rows: torch.Tensor, cols: torch.Tensor):
    """Inside the ``with``, the output head sees only the hidden states at
    ``(rows[i], cols[i])`` of its ``[batch, keep, hidden]`` input and returns
    ``[1, len(rows), vocab]`` logits; whatever the model does to the logits afterwards
    (Gemma 2's soft-capping, a logit scale) is elementwise and applies unchanged. A model
    whose head is not a submodule it calls keeps its full logits."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        yield
        return
    previous = head.forward  # bound, with any forward accelerate or peft set on the module

    def forward(hidden, *args, **kwargs):
        if hidden.dim() != 3:
            return previous(hidden, *args, **kwargs)
        picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]
        return previous(picked[None], *args, **kwargs)

    with replaced_forward(head, forward):
        yield


def _loglikelihoods(model, tokenizer, requests, batch_size, progress, share_context=True,
                    head_at_scored=True):
    """``loglikelihoods`` plus the number of real (non-padding) tokens it ran.

    Rows of one batch score different numbers of final positions (``keep`` is the
    largest), so the output head runs on each row's scored positions alone
    (:func:`_head_at`): with a large vocabulary, the head is most of the work of
    multiple-choice scoring. ``head_at_scored=False`` computes the logits of every kept
    position of every row instead, for comparison.
    """
    if len(requests) == 0:
        raise ValueError("No requests to score; pass at least one (context, continuation) pair.")
    _check_tokenizer(model, tokenizer)
    device = input_device(model)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batches = plan_batches(model, tokenizer, requests, batch_size, share_context)
    with torch.inference_mode():
        for batch in tqdm(batches, desc="log-likelihood", disable=not progress):
            mask, positions = batch.attention_mask, batch.position_ids
            spans = [scored for scored, _ in batch.rows]
            rows = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(spans))
            cols = torch.cat([torch.arange(batch.keep - n, batch.keep) for n in spans])
            with _head_at(model, rows, cols) if head_at_scored else nullcontext():
                logits = model(batch.input_ids.to(device),
                               attention_mask=None if mask is None else mask.to(device),
                               position_ids=None if positions is None else positions.to(device),
                               use_cache=False, logits_to_keep=batch.keep).logits
            if logits.shape[:2] == (1, len(rows)):  # the head ran on the scored positions
                per_row = torch.split(logits[0], spans)
            else:
                per_row = [logits[r, batch.keep - n:] for r, n in enumerate(spans)]
            for (_, members), row_logits in zip(batch.rows, per_row):
                logprobs = torch.log_softmax(row_logits.float(), dim=-1)
                for i, cont, offset in members:
                    at = torch.tensor([0] + [offset + j for j in range(1, len(cont))],
                                      device=logprobs.device)
                    target = torch.tensor(cont, device=logprobs.device)
                    picked = logprobs[at]
                    ll = float(picked.gather(-1, target[:, None]).sum())
                    results[i] = (ll, bool((picked.argmax(-1) == target).all()))
    tokens = sum(batch.tokens for batch in batches)
    return results, tokens


# ------------------------------------------------------------------- multiple choice


def _check_items(items: Sequence[Item]) -> None:
    if len(items) == 0:
        raise ValueError("The item list is empty; load some with load_benchmark(name, n).")
    for i, item in enumerate(items):
        if item.greedy:
            if len(item.requests) != 1 or item.label != 0:
                raise ValueError(f"Item {i} ({item.task}) is greedy, so it needs exactly one "
                                 "request and label 0.")
            continue
        if len(item.requests) < 2:
            raise ValueError(f"Item {i} ({item.task}) has {len(item.requests)} choice; multiple "
                             "choice needs at least two.")
        if len(item.choices) != len(item.requests):
            raise ValueError(f"Item {i} ({item.task}) has {len(item.choices)} choices but "
                             f"{len(item.requests)} requests; give one request per choice.")
        if not 0 <= item.label < len(item.requests):
            raise ValueError(f"Item {i} ({item.task}) has label {item.label}, outside 0.."
                             f"{len(item.requests) - 1}; the label is the index of the right "
                             "choice.")


def _reports_acc_norm(task: str) -> bool:
    return task.split(":", 1)[0] not in _NO_ACC_NORM


def score_items(model, tokenizer, items: Sequence[Item], batch_size: int = 16,
                progress: bool = True) -> pd.DataFrame:
    """Score each item; one row per item, for looking at single questions.

    Columns: ``task``, ``label``, ``pred`` (argmax of the log-likelihoods), ``pred_norm``
    (argmax of log-likelihood / ``len(choice)`` in characters), ``correct``,
    ``correct_norm`` (NaN where lm-evaluation-harness reports no acc_norm for the task,
    and for greedy items), ``loglikelihoods`` (a tuple per item), ``greedy``.

    The choice lengths are those of ``item.choices``, the answer texts without the
    leading space, exactly as lm-evaluation-harness's ``len(choice)``. Ties go to the
    first choice (``numpy.argmax``). Greedy items (LAMBADA) are right when every target
    token is the model's argmax.
    """
    return _score_items(model, tokenizer, items, batch_size, progress)[0]


def _score_items(model, tokenizer, items, batch_size, progress):
    _check_items(items)
    requests = [r for item in items for r in item.requests]
    scores, tokens = _loglikelihoods(model, tokenizer, requests, batch_size, progress)
    rows, at = [], 0
    for item in items:
        item_scores = scores[at:at + len(item.requests)]
        at += len(item.requests)
        lls = np.array([s for s, _ in item_scores], dtype=np.float64)
        if item.greedy:
            pred, pred_norm = (0 if item_scores[0][1] else -1), -1
            correct, correct_norm = float(item_scores[0][1]), math.nan
        else:
            lengths = np.array([float(len(c)) for c in item.choices])
            pred = int(np.argmax(lls))
            with np.errstate(divide="ignore", invalid="ignore"):
                pred_norm = int(np.argmax(lls / lengths))
            correct = float(pred == item.label)
            correct_norm = float(pred_norm == item.label) if _reports_acc_norm(item.task) \
                else math.nan
        rows.append({"task": item.task, "label": item.label, "pred": pred,
                     "pred_norm": pred_norm, "correct": correct, "correct_norm": correct_norm,
                     "loglikelihoods": tuple(float(x) for x in lls), "greedy": item.greedy})
    return pd.DataFrame(rows), tokens


def _task_name(tasks) -> str:
    names = sorted(set(tasks))
    if len(names) == 1:
        return names[0]
    parents = sorted({t.split(":", 1)[0] for t in names})
    return parents[0] if len(parents) == 1 else "+".join(parents)


def _summary(values: np.ndarray, prefix: str) -> dict:
    values = values[~np.isnan(values)]  # items whose task does not report this metric
    if len(values) == 0:
        return {prefix: math.nan, f"{prefix}_stderr": math.nan,
                f"{prefix}_ci_low": math.nan, f"{prefix}_ci_high": math.nan}
    low, high = binomial_ci(int(values.sum()), len(values))
    return {prefix: float(values.mean()), f"{prefix}_stderr": _mean_stderr(values),
            f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}


def evaluate_choices(model, tokenizer, items: Sequence[Item], batch_size: int = 16,
                     progress: bool = True) -> dict:
    """Zero-shot accuracy on ``items``, scored by log-likelihood as lm-evaluation-harness
    does.

    For an item with choices :math:`c_i` and continuation log-likelihoods :math:`\\ell_i`,

    .. math:: \\mathrm{acc} = [\\arg\\max_i \\ell_i = y], \\qquad
              \\mathrm{acc\\_norm} = [\\arg\\max_i \\ell_i / |c_i| = y]

    with :math:`|c_i|` the length of the choice text in characters (``len(choice)``, not
    counting the space in front of it), averaged over items. ``acc_norm`` is NaN for tasks
    whose lm-evaluation-harness config reports acc alone: MMLU, BoolQ, Winogrande and
    LAMBADA (where acc means the greedy continuation is the target word).

    Each accuracy comes with ``*_stderr`` (lm-evaluation-harness's standard error of the
    mean, sample standard deviation over :math:`\\sqrt n`) and a 95% Wilson score interval
    ``*_ci_low`` .. ``*_ci_high`` (see ``binomial_ci``).

    Returns a dict: ``task``, ``n``, ``acc``, ``acc_stderr``, ``acc_ci_low``,
    ``acc_ci_high``, the same four for ``acc_norm``, ``chance`` (mean of 1 / number of
    choices; 0 for greedy items), ``perplexity`` (greedy items only: lm-evaluation-harness's
    LAMBADA perplexity, exp of minus the mean log-likelihood of the target), ``tokens``
    (tokens scored, counting each distinct input once) and ``seconds``.
    """
    _check_items(items)
    t0 = time.perf_counter()
    per_item, tokens = _score_items(model, tokenizer, items, batch_size, progress)
    seconds = time.perf_counter() - t0
    greedy = per_item["greedy"].to_numpy(bool)
    lls = per_item["loglikelihoods"]
    ppl = math.exp(-float(np.mean([ll[0] for ll in lls[greedy]]))) if greedy.all() else math.nan
    chance = float(np.mean([0.0 if it.greedy else 1.0 / len(it.requests) for it in items]))
    return {"task": _task_name(per_item["task"]), "n": len(items),
            **_summary(per_item["correct"].to_numpy(float), "acc"),
            **_summary(per_item["correct_norm"].to_numpy(float), "acc_norm"),
            "chance": chance, "perplexity": ppl,
            "tokens": tokens, "seconds": seconds}


def evaluate_suite(model, tokenizer, tasks: Mapping[str, int | None] | None = None,
                   seed: int = 0, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """``evaluate_choices`` on several benchmarks; one row per task.

    ``tasks`` maps a ``load_benchmark`` name to a number of items (``None`` for all of
    them); the default is ``DEFAULT_SUITE``, 200 items each of MMLU, PIQA, HellaSwag,
    ARC-Easy, BoolQ and Winogrande. The subsets are drawn with ``seed``, so every chapter
    that uses the same tasks and seed evaluates the same items.

    Columns: those of ``evaluate_choices`` (``task``, ``n``, ``acc``, ``acc_stderr``,
    ``acc_ci_low``, ``acc_ci_high``, ``acc_norm`` and its three, ``chance``,
    ``perplexity``, ``tokens``, ``seconds``).
    """
    tasks = DEFAULT_SUITE if tasks is None else tasks
    if not tasks:
        raise ValueError("No tasks given; pass e.g. {'piqa': 200} or leave tasks=None for "
                         "DEFAULT_SUITE.")
    rows = []
    for name, n in tasks.items():
        items = load_benchmark(name, n, seed=seed)
        row = evaluate_choices(model, tokenizer, items, batch_size=batch_size, progress=progress)
        rows.append({**row, "task": name})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- generation


def decoded_accuracy(model, tokenizer, items: Sequence[Item], progress: bool = True) -> dict:
    """Greedy accuracy on LAMBADA-style items (``item.greedy``), computed as generation
    computes it: the context is read in one forward pass that fills the KV cache and
    predicts the first target token, then each later target token must be the greedy
    choice of a one-token decoding step fed the target token before it.

    For a plain model this is lm-evaluation-harness's greedy check up to float rounding;
    for :func:`shortgpt_lite.generation.shortgpt_gen` it is not, since only the first
    prediction comes from the pruned prefill and the steps after it run every layer.
    Returns ``acc`` with its Wilson interval, ``first_token_acc`` (the prefill's
    prediction alone), ``n`` and ``correct``, a per-item bool array for paired comparisons.
    """
    _check_items(items)
    if not all(item.greedy for item in items):
        raise ValueError("decoded_accuracy scores greedy items (LAMBADA); load them with "
                         "load_benchmark('lambada', n).")
    _check_tokenizer(model, tokenizer)
    device, cache = input_device(model), cache_keyword(model)
    correct, first = [], []
    with torch.inference_mode():
        for item in tqdm(items, desc="decoding", disable=not progress):
            context, target = _encode_requests(tokenizer, item.requests)[0]
            out = model(input_ids=torch.tensor([context], device=device), use_cache=True)
            hits = [int(out.logits[0, -1].argmax()) == target[0]]
            for previous, wanted in zip(target, target[1:]):
                out = model(input_ids=torch.tensor([[previous]], device=device),
                            use_cache=True, **{cache: out[cache]})
                hits.append(int(out.logits[0, -1].argmax()) == wanted)
            correct.append(all(hits))
            first.append(hits[0])
    correct = np.array(correct)
    low, high = binomial_ci(int(correct.sum()), len(correct))
    return {"acc": float(correct.mean()), "acc_ci_low": low, "acc_ci_high": high,
            "first_token_acc": float(np.mean(first)), "n": len(correct), "correct": correct}


def generation_samples(model, tokenizer, prompts: Sequence[str] = GENERATION_PROMPTS,
                       max_new_tokens: int = 40, progress: bool = True) -> pd.DataFrame:
    """Greedy continuations of fixed ``prompts``, one row per prompt.

    Each prompt runs alone (batch 1, no padding) with ``do_sample=False``, so the text
    depends only on the model. Generation stops at ``max_new_tokens`` or at the
    end-of-sequence token. Columns: ``prompt``, ``continuation`` (the new text only),
    ``new_tokens``.
    """
    if len(prompts) == 0:
        raise ValueError("No prompts given; pass a list of strings or use GENERATION_PROMPTS.")
    _check_tokenizer(model, tokenizer)
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    with torch.inference_mode():
        for prompt in tqdm(prompts, desc="generating", disable=not progress):
            enc = tokenizer(prompt, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            out = model.generate(ids, attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            new = out[0, ids.shape[1]:]
            rows.append({"prompt": prompt,
                         "continuation": tokenizer.decode(new, skip_special_tokens=True),
                         "new_tokens": int(new.numel())})
    return pd.DataFrame(rows)
