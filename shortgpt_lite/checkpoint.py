"""A checkpoint on disk, read and pruned tensor by tensor, never loaded whole.

A model saved by ``save_pretrained`` is a folder: ``config.json`` and its weights in one
``model.safetensors`` file or in shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard). safetensors files can be opened lazily
(``safe_open``), so one tensor can be read without reading the others. Two steps of the
library build on that:

* layer-streamed scoring (:mod:`shortgpt_lite.stream`) builds the model's skeleton
  without weights (:func:`empty_model`, accelerate's ``init_empty_weights``) and loads one
  decoder block at a time (:meth:`Checkpoint.load_into`);
* :func:`prune_checkpoint` writes a checkpoint without some decoder blocks, copying the
  kept blocks' tensors shard by shard under their new indices. Its peak memory is the
  largest shard, whatever the model's size, and the result equals
  ``remove_layers(model, layers).save_pretrained(out)`` tensor for tensor.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .layers import decoder_layers, decoder_layers_path

__all__ = ["Checkpoint", "copy_extras", "empty_model", "model_folder", "prune_checkpoint",
           "write_index"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def model_folder(source) -> Path:
    """The local folder of ``source``: a bundled model's name (its converted cache, built
    on first use), a folder written by ``save_pretrained``, or a Hugging Face hub id,
    whose config and safetensors files are downloaded (or found in the hub cache)."""
    from .models import model_source

    source = model_source(str(source))
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))


class Checkpoint:
    """The safetensors weights of a model folder, by tensor name, read on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ValueError(f"{self.folder} has no config.json: pass a folder written by "
                             "save_pretrained (or a hub id).")
        if (self.folder / _INDEX).is_file():
            index = json.loads((self.folder / _INDEX).read_text())
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self.metadata = dict(index.get("metadata", {}))
        elif (self.folder / _SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.folder / _SINGLE, framework="pt") as f:
                self.weight_map = {k: _SINGLE for k in f.keys()}
            self.metadata = {}
        else:
            found = sorted(p.name for p in self.folder.iterdir())[:8]
            raise ValueError(
                f"{self.folder} holds no safetensors weights (neither {_SINGLE} nor {_INDEX}; "
                f"found {found}). Streaming and prune_checkpoint read safetensors only: load the "
                "model once and save it with save_pretrained(..., safe_serialization=True).")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is stored in."""
        from safetensors import safe_open

        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            return _DTYPES[f.get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (on the CPU, in the dtype it was saved in). The
        shard is mapped for this read only, so the pages read stop counting as this
        process's memory once the tensor is copied out."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(f"{self.folder} has no tensor {name!r}.")
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    def nbytes(self, prefix: str = "") -> int:
        """Bytes on disk of the tensors whose names start with ``prefix``."""
        from safetensors import safe_open

        total = 0
        for shard in self.shards():
            with safe_open(self.folder / shard, framework="pt") as f:
                for name in f.keys():
                    if name.startswith(prefix) and self.weight_map.get(name) == shard:
                        s = f.get_slice(name)
                        total += _numel(s.get_shape()) * _itemsize(s.get_dtype())
        return total

    def load_into(self, module: nn.Module, prefix: str, device, dtype: torch.dtype,
                  skip: tuple[str, ...] = ()) -> None:
        """Give every parameter and persistent buffer of ``module`` (built without weights)
        its tensor ``prefix + name``, cast to ``dtype`` (floating tensors only) on
        ``device``. Names starting with an entry of ``skip`` are left as they are."""
        from accelerate.utils import set_module_tensor_to_device

        for name, current in module.state_dict(keep_vars=True).items():
            if name.startswith(skip):
                continue
            key = prefix + name
            if key not in self.weight_map:
                raise ValueError(f"{self.folder} has no tensor {key!r}, which the model's "
                                 f"config expects; is the checkpoint complete, and saved by "
                                 "save_pretrained of this architecture?")
            value = self.get(key)
            if value.is_floating_point():
                value = value.to(dtype)
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"{key}: the checkpoint holds shape {tuple(value.shape)}, the "
                                 f"config expects {tuple(current.shape)}.")
            set_module_tensor_to_device(module, name, device, value=value)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


_DTYPES = {"F64": torch.float64, "I64": torch.int64, "F32": torch.float32, "I32": torch.int32,
           "F16": torch.float16, "BF16": torch.bfloat16, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
            "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}[dtype]


def write_index(out: Path, weight_map: dict, source: Checkpoint) -> None:
    """``model.safetensors.index.json`` of the shards in ``out`` (``weight_map``: tensor
    name -> shard), with the metadata of ``source`` and the new total size."""
    from safetensors import safe_open

    total = 0
    for shard in dict.fromkeys(weight_map.values()):
        with safe_open(out / shard, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
    index = {"metadata": {**source.metadata, "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / _INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_extras(folder: Path, out: Path) -> None:
    """Copy the files of a model folder other than its config and weights (tokenizer,
    generation config) that ``out`` does not have yet."""
    for item in Path(folder).iterdir():
        if item.is_file() and item.name not in {"config.json", _INDEX} \
                and not item.name.endswith(".safetensors") and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)


def empty_model(folder, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``folder``'s config with every parameter on the meta device (no memory),
    in eval mode. Buffers that are not saved (rotary frequencies, embedding scales) are
    real, made by the model's own constructor as ``from_pretrained(..., dtype=dtype)``
    makes them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import quiet_transformers

    config = AutoConfig.from_pretrained(folder)
    with quiet_transformers(), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else
                                                            {"dtype": dtype}))
    return model.eval()


def prune_checkpoint(src, layers, out, *, scores=None, metric: str | None = None) -> Path:
    """Write the checkpoint ``src`` without decoder blocks ``layers`` to the folder ``out``.

    Shard by shard, the kept blocks' tensors are copied under their new indices and the
    removed blocks' are dropped; ``config.json`` gets the new ``num_hidden_layers``, the
    per-layer lists (Gemma-3's ``layer_types``) and the pruning record that
    :func:`shortgpt_lite.removal.remove_layers` writes; the shard index is rewritten. Other
    files of ``src`` (tokenizer, generation config) are copied. Memory: one shard.

    ``src`` is anything :func:`model_folder` accepts. ``out`` must not exist yet, or be
    empty, so that nothing is overwritten.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from .removal import prune_config

    folder = model_folder(src)
    checkpoint = Checkpoint(folder)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pass a new folder for the pruned "
                         "checkpoint.")
    if out.resolve() == folder.resolve():
        raise ValueError("out must be another folder than the source checkpoint.")
    config = AutoConfig.from_pretrained(folder)
    skeleton = empty_model(folder)
    path = decoder_layers_path(skeleton) + "."
    new_index = prune_config(config, layers, len(decoder_layers(skeleton)), scores=scores,
                             metric=metric)
    block = re.compile(re.escape(path) + r"(\d+)\.(.*)")

    def renamed(name: str) -> str | None:
        m = block.fullmatch(name)
        if m is None:
            return name
        old = int(m.group(1))
        return None if old not in new_index else f"{path}{new_index[old]}.{m.group(2)}"

    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard in checkpoint.shards():
        tensors = {}
        for name in [k for k, s in checkpoint.weight_map.items() if s == shard]:
            new = renamed(name)
            if new is not None:
                tensors[new] = checkpoint.get(name)
        if tensors:
            save_file(tensors, out / shard, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, shard)
        del tensors
    if (folder / _INDEX).is_file():
        write_index(out, weight_map, checkpoint)
    config.save_pretrained(out)
    copy_extras(folder, out)
    return out
