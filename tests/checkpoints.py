"""Tiny random-weight Hugging Face checkpoints written by the tests (Llama, Qwen2, Mistral; GQA, MQA, MHA)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

SHAPE = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
)
CHECKPOINTS = {
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "llama-mha-llama3-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2-gqa-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "mistral-mqa": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(num_key_value_heads=1)),
    "mistral-mha": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(num_key_value_heads=4)),
}


def save_tokenizer(model_path: Path, folder: Path) -> None:
    """The embedded model's tokenizer as HF tokenizer files."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name).save_pretrained(str(folder))


def write_checkpoint(name: str, folder: Path, tokenizer_dir: Path, vocab_size: int = 49152, **shape: int):
    """Save a random model of the named kind (its SHAPE and settings changed by `shape`) with the given tokenizer
    files; returns the transformers model."""
    config_class, model_class, extra = CHECKPOINTS[name]
    torch.manual_seed(sum(map(ord, name)))
    config = config_class(vocab_size=vocab_size, **{**SHAPE, **extra, **shape})
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the init's 0.02 std, so logits are not all ties
            parameter.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return model


def write_perturbed_copy(source: Path, folder: Path, relative_noise: float, seed: int = 5) -> None:
    """The checkpoint in `source` with noise of `relative_noise` times each weight's std added: another model with
    the same tokenizer whose greedy choices mostly, not always, agree with the source's (a draft model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * relative_noise * parameter.std())
    model.save_pretrained(str(folder))
    for file in source.iterdir():  # the tokenizer's files: whatever save_pretrained did not write
        if file.is_file() and not (folder / file.name).exists():
            (folder / file.name).write_bytes(file.read_bytes())
