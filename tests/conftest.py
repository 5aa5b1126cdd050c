"""Shared fixtures. The bundled model loads once per test session (from the
safetensors cache after the very first run)."""

import pytest
import torch


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
