"""Shared fixtures. The bundled model loads once per test session (from the
safetensors cache after the very first run)."""

import os

import pytest
import torch

# Figures are drawn without a display in every test.
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M in fp32 on the CPU, as ``(model, tokenizer)``."""
    from shortgpt_lite import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """The bundled Gemma-3-270M in fp32 on the CPU, as ``(model, tokenizer)``."""
    from shortgpt_lite import load_model

    return load_model("gemma3-270m", device="cpu")


@pytest.fixture
def one_thread():
    """Run on one CPU thread. On a shared 2-core machine under load, two OpenMP threads
    wait for each other at every operation: a tiny model's forward pass measured 1.4 s
    with two threads and 5 ms with one. Correctness does not depend on the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
