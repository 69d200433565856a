"""Fixtures of the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A one-layer random Llama (GQA): each logprob depends on the kept K/V of that layer alone."""
    folder = tmp_path_factory.mktemp("one-layer-llama")
    write_checkpoint("llama-gqa", folder, tokenizer_dir, num_hidden_layers=1)
    return folder
