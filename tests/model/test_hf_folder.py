"""Hugging Face folders: tiny random-weight checkpoints against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.errors import UnsupportedModelError
from tests.checkpoints import CHECKPOINTS, write_checkpoint
from tests.reference import TOP_LOGPROBS, check_logprobs_close, hf_greedy, paged_last_logits

pytestmark = pytest.mark.reference

PROMPTS = ["Hello there, how are you today?", "一二三四五", "The quick brown fox jumps over the lazy dog " * 3]


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_tiny_checkpoint_matches_transformers(name: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    reference = write_checkpoint(name, tmp_path, tokenizer_dir, vocab_size=49152)
    llm = LLM(model=str(tmp_path), dtype="float32", quantization="none", kv_cache_memory=2**24)
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
