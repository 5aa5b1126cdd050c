"""Layer-streamed scoring: the statistics of a model larger than memory, one block at a time.

Every statistic of :func:`shortgpt_lite.hooks.layer_statistics` that compares the states
around blocks (Block Influence, relative magnitude, angular distances, the similarity
matrix) needs block ``i`` once: its input ``x_i`` for every calibration token, and its
output ``x_{i+1} = x_i + f_i(x_i)``. So instead of running the whole model per batch, the
pass runs every batch through one block before loading the next:

1. the model's skeleton is built without weights (accelerate's ``init_empty_weights``)
   and only the tensors outside the blocks (the embedding) are loaded;
2. one forward per batch, with every block replaced by a recorder, yields ``x_0`` and the
   arguments the model hands each block (attention masks, rotary embeddings: Gemma-3's
   differ between its sliding-window and global layers);
3. for ``i = 0 … L-1``: block ``i``'s tensors are read from the safetensors shards
   (:class:`shortgpt_lite.checkpoint.Checkpoint`), every batch goes through it with the
   same hooks as the in-memory pass, ``x_{i+1}`` replaces ``x_i``, and the block is freed.

The sums are added in the same order as in the in-memory pass (block ``i``'s batch 1, then
batch 2, ...), so the statistics agree with it to fp32 rounding.

Memory is one block's weights, the embedding, and the activations: ``tokens × hidden``
values for ``x_i``, plus the earlier states the pairwise statistics keep (N of them for
angular distances up to N, L+1 for the similarity matrix, one token per sequence with
``pair_tokens="last"``). The activations stay on the GPU when they fit in half its free
memory, otherwise they wait in pinned CPU memory. For Llama-2-70B in bf16 a block is
0.86 GB, against 140 GB for the whole model.

Time is close to reading the weights once, plus the compute of one forward pass.

A metric that needs more than the states around one block cannot be streamed: skip-one
perplexity runs every block after the skipped one and the LM head, Taylor importance a
backward pass through the whole stack. :func:`check_streamable` refuses them.

With ``resume_dir``, the state after every block (activations, sums, per-batch pair
states) is written there, and a rerun with the same inputs continues after the last
block that finished.

Wanda is block-sequential already (:mod:`shortgpt_lite.wanda`), so
:func:`streamed_wanda` runs it the same way: load a block, calibrate it on the pruned
outputs of the blocks before it, prune it, write it out as a shard of its own, free it.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, empty_model, model_folder
from .hooks import LayerStatistics, make_collector
from .inputs import check_token_ids, iter_batches, model_inputs
from .layers import decoder_layers, decoder_layers_path, replaced_forward, stop_after

__all__ = ["STREAMABLE", "check_streamable", "streamed_layer_statistics", "streamed_wanda"]

# The layer_importance metrics a streamed pass can compute, and why the others cannot.
STREAMABLE = ("bi", "angular", "relative_magnitude", "sequential", "reverse", "random")
_NOT_STREAMABLE = {
    "ppl": "skip-one perplexity runs every block after the skipped one, and the LM head, once "
           "per skipped block",
    "taylor": "Taylor importance needs a backward pass through the whole stack",
}
_RESUME_FILE = "stream_state.pt"


def check_streamable(metric: str) -> None:
    """``ValueError`` for a metric that needs the whole model at once, saying why."""
    if metric in _NOT_STREAMABLE:
        raise ValueError(f"The {metric!r} metric cannot be streamed one block at a time: "
                         f"{_NOT_STREAMABLE[metric]}. Stream one of {', '.join(STREAMABLE)}, or "
                         "load the whole model with load_model and score it in memory.")


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _record_calls(model, layers, ids, mask, device, as_tuple: bool):
    """One forward of the model with every block replaced by a recorder of its inputs."""
    calls: list = [None] * len(layers)
    first: list = []

    def recorder(i):
        def record(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            if i == 0:
                first.append(hidden.detach())
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return (hidden,) if as_tuple else hidden
        return record

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.enter_context(replaced_forward(layer, recorder(i)))
        stack.enter_context(stop_after(layers[-1]))
        with torch.no_grad():
            model(**model_inputs(model, ids.to(device), mask.to(device)))
    return first, calls


def _capture(model, layers, ids, mask, device):
    """``x_0`` of one batch, the ``(args, kwargs)`` the model passes to every block, and
    whether a block returns a tuple.

    The recorders return their input as the block would return its output: a tensor, as
    transformers' blocks do, or else a 1-tuple, as Falcon's (whose model reads
    ``outputs[0]``)."""
    failure = None
    for as_tuple in (False, True):
        try:
            first, calls = _record_calls(model, layers, ids, mask, device, as_tuple)
        except (TypeError, IndexError, ValueError, RuntimeError) as error:
            failure = failure or error
            continue
        if all(c is not None for c in calls) and first:
            return first[0], calls, as_tuple
    raise RuntimeError("The model's forward did not pass every decoder block a hidden state "
                       "this pass could record, so this architecture cannot be streamed block "
                       "by block; score it in memory with load_model.") from failure


class _Skeleton:
    """The model of ``source`` without weights, but for the tensors outside its decoder
    blocks (the embedding; an untied LM head stays empty), on ``device`` in ``dtype``."""

    def __init__(self, source, device, dtype):
        from .models import pick_device, resolve_dtype

        self.folder = model_folder(source)
        self.checkpoint = Checkpoint(self.folder)
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = empty_model(self.folder, self.dtype)
        self.layers = decoder_layers(self.model)
        self.prefix = decoder_layers_path(self.model) + "."
        model = self.model
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        skip = (self.prefix,) + (() if tied or head is None else
                                 tuple(f"{name}." for name, m in model.named_modules()
                                       if m is head))
        self.checkpoint.load_into(model, "", self.device, self.dtype, skip=skip)
        for module in model.modules():  # rotary frequencies, embedding scales
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)

    def free_outside_blocks(self) -> None:
        """Once the batches are embedded, only the blocks run."""
        for name, _ in list(self.model.named_parameters()):
            if not name.startswith(self.prefix):
                set_module_tensor_to_device(self.model, name, "meta")


def _activation_device(device: torch.device, nbytes: int) -> torch.device:
    """Keep the activations on the GPU when they fit in half its free memory."""
    if device.type == "cuda" and nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


def _store(x: torch.Tensor, where: torch.device) -> torch.Tensor:
    if where.type == "cpu" and x.device.type != "cpu" and torch.cuda.is_available():
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return out.copy_(x, non_blocking=False)
    return x.to(where)


def _fingerprint(folder: Path, batches, options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"folder": str(folder.resolve()), **options}, sort_keys=True,
                        default=str).encode())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for ids, mask in batches:
        h.update(ids.numpy().tobytes())
        h.update(mask.numpy().tobytes())
    return h.hexdigest()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if obj.__class__.__name__ == "deque":
        return type(obj)((_to_cpu(v) for v in obj), maxlen=obj.maxlen)
    return obj


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(_to_cpu(state), tmp)
    os.replace(tmp, path)


def streamed_layer_statistics(source, data, *, batch_size: int = 8,
                              relative_magnitude: bool = False, similarity: bool = False,
                              angular: int = 0, pair_tokens: str = "all", norms: bool = False,
                              device="auto", dtype=None, resume_dir=None,
                              distributed: bool = False,
                              progress: bool = True) -> LayerStatistics:
    """:func:`shortgpt_lite.hooks.layer_statistics` of the model in ``source`` (a folder
    with safetensors weights, a hub id or a bundled model's name), loading one decoder
    block at a time. The options mean what they mean there; the result is the same to
    fp32 rounding.

    ``device`` and ``dtype`` are those each block runs in (``"auto"``: the GPU if there is
    one, in bf16; else the CPU in fp32). With ``resume_dir``, the state after each block
    is kept there, and a call with the same inputs continues where an interrupted one
    stopped; the folder is left for the caller to delete. ``distributed``: each rank
    streams its own share of the data and the sums are all-reduced, as in
    :func:`~shortgpt_lite.hooks.layer_statistics`.
    """
    s = _Skeleton(source, device, dtype)
    folder, checkpoint, dev, dt, model, layers, prefix = \
        s.folder, s.checkpoint, s.device, s.dtype, s.model, s.layers, s.prefix
    n = len(layers)
    collector = make_collector(n, relative_magnitude, similarity, angular, pair_tokens, norms)

    batches = [(ids.cpu(), mask.cpu()) for ids, mask in iter_batches(data, batch_size)]
    if not batches:
        raise ValueError("The calibration data holds no batch.")
    options = {"relative_magnitude": relative_magnitude, "similarity": similarity,
               "angular": angular, "pair_tokens": pair_tokens, "norms": norms,
               "batch_size": batch_size, "dtype": str(dt)}
    state_path = None if resume_dir is None else Path(resume_dir) / _RESUME_FILE
    fingerprint = _fingerprint(folder, batches, options) if state_path else None

    # The arguments of every block, one forward per batch through recorders.
    xs, calls, contexts = [], [], []
    for ids, mask in tqdm(batches, desc="embedding the batches", unit="batch",
                          disable=not progress):
        check_token_ids(model, ids)
        collector.begin(mask)
        contexts.append(collector.batch_state())
        x0, c, _ = _capture(model, layers, ids, mask, dev)
        xs.append(x0)
        calls.append(c)
    s.free_outside_blocks()
    tokens = sum(x.numel() for x in xs)
    kept = 1 + (n + 1 if similarity else angular) * (1 if pair_tokens == "all" else 0)
    where = _activation_device(dev, tokens * xs[0].element_size() * kept)
    xs = [_store(x, where) for x in xs]

    start = 0
    if state_path is not None and state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(f"{state_path} holds a streamed run of other inputs (model, data "
                             "or options). Pass another resume_dir, or delete that file to "
                             "start again.")
        start = saved["next_layer"]
        xs = [_store(x, where) for x in saved["states"]]
        contexts = [{**c, "_masks": {}} for c in saved["contexts"]]
        collector.__dict__.update(saved["collector"])
    elif state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)

    was_grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        for i in tqdm(range(start, n), desc="streamed blocks", unit="block",
                      initial=start, total=n, disable=not progress):
            layer = layers[i]
            checkpoint.load_into(layer, f"{prefix}{i}.", dev, dt)
            handle = layer.register_forward_hook(collector.hook(i), with_kwargs=True)
            try:
                for b, per_block in enumerate(calls):
                    args, kwargs = per_block[i]
                    collector.resume_batch(contexts[b])
                    out = layer(xs[b].to(dev, non_blocking=True), *args, **kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    contexts[b] = collector.batch_state()
                    xs[b] = _store(out.detach(), where)
            finally:
                handle.remove()
            layer.to("meta")
            if state_path is not None:
                saved_collector = {k: v for k, v in collector.__dict__.items()
                                   if k not in collector._BATCH_STATE}
                _save_state(state_path, {"fingerprint": fingerprint, "next_layer": i + 1,
                                         "states": xs, "contexts": contexts,
                                         "collector": saved_collector})
    finally:
        torch.set_grad_enabled(was_grad)
    for b, context in enumerate(contexts):
        if context.get("seen") != n:
            raise RuntimeError(f"Batch {b} went through {context.get('seen')} of {n} blocks.")
    if distributed:
        collector.all_reduce()
    return collector.finish()


def streamed_wanda(source, windows: torch.Tensor, out, sparsity=0.5, *, per: str = "row",
                   batch_size: int = 8, device="auto", dtype=None,
                   progress: bool = True) -> Path:
    """Wanda on a checkpoint larger than memory, written to the folder ``out`` block by
    block: each block is loaded, calibrated on the pruned outputs of the blocks before it,
    pruned (:func:`shortgpt_lite.wanda.wanda_prune_block`), written as a shard of its own
    in the dtype it was stored in, and freed. The tensors outside the blocks are copied;
    the config gets the sparsity record :func:`~shortgpt_lite.wanda.wanda_prune` writes.
    The result equals ``wanda_prune(model, windows, ...)`` saved (a test checks it).
    ``windows`` is a LongTensor ``[n, seq_len]`` of calibration tokens."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from .checkpoint import copy_extras, write_index
    from .records import SPARSITY_RECORD
    from .wanda import sparsity_entry, wanda_prune_block

    entry = sparsity_entry("wanda", sparsity, per, windows)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pass a new folder for the pruned "
                         "checkpoint.")
    s = _Skeleton(source, device, dtype)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a LongTensor [n, seq_len] of token ids, as "
                         "token_windows returns.")
    hidden, per_block, tuple_output = [], [[] for _ in s.layers], False
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        check_token_ids(s.model, ids)
        x0, calls, tuple_output = _capture(s.model, s.layers, ids, torch.ones_like(ids), s.device)
        hidden.append(x0)
        for b, call in enumerate(calls):
            per_block[b].append(call)
    s.free_outside_blocks()
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    n = len(s.layers)
    with torch.inference_mode():
        for i in tqdm(range(n), desc=f"streamed Wanda {sparsity}", unit="block",
                      disable=not progress):
            layer = s.layers[i]
            s.checkpoint.load_into(layer, f"{s.prefix}{i}.", s.device, s.dtype)
            hidden = wanda_prune_block(layer, hidden, per_block[i], tuple_output, sparsity,
                                       per=per, outputs=i < n - 1)
            shard = f"model-block-{i:05d}.safetensors"
            tensors = {f"{s.prefix}{i}.{k}": v.to(s.checkpoint.stored_dtype(f"{s.prefix}{i}.{k}"))
                       .contiguous().cpu() for k, v in layer.state_dict().items()}
            save_file(tensors, out / shard, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, shard)
            layer.to("meta")
    rest = {k: s.checkpoint.get(k) for k in s.checkpoint.weight_map if not k.startswith(s.prefix)}
    save_file(rest, out / "model-rest.safetensors", metadata={"format": "pt"})
    weight_map |= dict.fromkeys(rest, "model-rest.safetensors")
    write_index(out, weight_map, s.checkpoint)
    config = AutoConfig.from_pretrained(s.folder)
    setattr(config, SPARSITY_RECORD, entry)
    config.save_pretrained(out)
    copy_extras(s.folder, out)
    return out
