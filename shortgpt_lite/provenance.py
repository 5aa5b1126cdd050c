"""Where a number came from: the machine, the software and the commit that computed it.

A stored reference run carries :func:`environment` in its provenance record, and every
benchmark prints :func:`machine` next to its figures.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_name", "environment", "git_commit", "machine"]


def cpu_name() -> str:
    """The CPU's model name, from ``/proc/cpuinfo`` where there is one."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine, for the README next to the figures."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{gpu}, torch {torch.__version__}, Python {platform.python_version()}")


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout this library runs from (or ``root``), with ``+dirty`` when
    its tracked files differ from it, outside ``results/``: a run that rewrites its own
    stored tables is not running changed code. ``None`` outside a git checkout (an
    installed wheel)."""
    root = root or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", ".", ":(exclude)results"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(device: torch.device | None = None) -> dict:
    """Versions, commit and hardware, as a flat JSON-ready dict."""
    import transformers

    from . import __version__

    gpu = None
    if device is not None and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return {"shortgpt_lite": __version__, "commit": git_commit(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "machine": machine()}
