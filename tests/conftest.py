"""Shared fixtures: the embedded model, loaded once per session, and its Hugging Face reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM
from pagedllm.model.registry import resolve_model_path
from tests.checkpoints import save_tokenizer, write_checkpoint, write_perturbed_copy

# Small enough to keep a test session light, large enough for every parity prompt.
ROOMY_KV_BYTES = 2**28


@pytest.fixture(scope="session")
def model_path() -> Path:
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The embedded model dense in float32 with a roomy cache; tests must not change its settings."""
    return LLM(dtype="float32", quantization="none", kv_cache_memory=ROOMY_KV_BYTES)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """The embedded model's tokenizer saved as Hugging Face tokenizer files."""
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(model_path, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A two-layer random Llama (GQA) in an HF folder: fast enough for randomized engine tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    write_checkpoint("llama-gqa", folder, tokenizer_dir)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_draft_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama with its weights perturbed: a draft model for it that is right about half the time."""
    folder = tmp_path_factory.mktemp("tiny-llama-draft")
    write_perturbed_copy(tiny_llama_dir, folder, relative_noise=0.03)
    return folder


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """Hugging Face transformers running the same GGUF weights, the reference for correctness."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()
