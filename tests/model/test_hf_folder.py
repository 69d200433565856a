"""Tiny random-weight Hugging Face checkpoints (Llama, Qwen2, Mistral; GQA and MHA) written by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.errors import UnsupportedModelError
from tests.reference import TOP_LOGPROBS, check_logprobs_close, hf_greedy, paged_last_logits

pytestmark = pytest.mark.reference

SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
CHECKPOINTS = {
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "llama-mha-llama3-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2-gqa-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "mistral-mqa": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(num_key_value_heads=1)),
    "mistral-mha": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(num_key_value_heads=4)),
}
PROMPTS = ["Hello there, how are you today?", "一二三四五", "The quick brown fox jumps over the lazy dog " * 3]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name).save_pretrained(str(folder))
    return folder


def write_checkpoint(name: str, folder: Path, tokenizer_dir: Path, vocab_size: int):
    config_class, model_class, extra = CHECKPOINTS[name]
    torch.manual_seed(sum(map(ord, name)))
    config = config_class(vocab_size=vocab_size, **SHAPE, **extra)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the init's 0.02 std, so logits are not all ties
            parameter.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return model


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_tiny_checkpoint_matches_transformers(name: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    reference = write_checkpoint(name, tmp_path, tokenizer_dir, vocab_size=49152)
    llm = LLM(model=str(tmp_path), kv_cache_memory=2**24)
    assert llm.engine.model_config.num_kv_heads == CHECKPOINTS[name][2]["num_key_value_heads"]
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    for token_ids in prompts:
        ours = paged_last_logits(llm.engine, token_ids, chunk_size=5)
        with torch.inference_mode():
            theirs = reference(torch.tensor([token_ids])).logits[0, -1].float()
        assert (ours - theirs).abs().max().item() < 1e-3
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate(prompts, params)
    for token_ids, output in zip(prompts, outputs):
        reference_greedy = hf_greedy(reference, token_ids, 24)
        check_logprobs_close((output.outputs[0].token_ids, output.outputs[0].logprobs), reference_greedy, name)


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    write_checkpoint("llama-gqa", tmp_path, tokenizer_dir, vocab_size=49152)
    config = (tmp_path / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(model=str(tmp_path))
