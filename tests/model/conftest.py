"""Fixtures shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model.test_gguf_native_loading import write_mixed_gguf


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama GGUF mixing Q4_K, Q5_K, Q6_K, Q5_0, Q8_0, Q4_0 and Q4_1 tensors, as Q4_K_M files do."""
    path = tmp_path_factory.mktemp("mixed") / "mixed-q4_k_m.gguf"
    write_mixed_gguf(path)
    return path
