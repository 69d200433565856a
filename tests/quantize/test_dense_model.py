"""The plain float forward that calibration runs agrees with Hugging Face transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm.model.loader import load_checkpoint
from pagedllm.quantize.dense_model import forward_logits
from tests.checkpoints import write_checkpoint


@pytest.mark.reference
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-bias", "llama-mha-llama3-rope"])
def test_dense_forward_matches_transformers(name: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    hf_model = write_checkpoint(name, tmp_path, tokenizer_dir)
    checkpoint = load_checkpoint(tmp_path, torch.float32)
    ids = torch.randint(0, checkpoint.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = hf_model(ids).logits
    torch.testing.assert_close(
        forward_logits(checkpoint.config, checkpoint.weights, ids), expected, rtol=1e-4, atol=1e-4
    )
