"""Mistral's sliding window: the whole context is served, attention sees the window, its blocks are given back."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.layers.attention import FREED_BLOCK
from tests.checkpoints import SHAPE
from tests.reference import paged_last_logits

WINDOW = 24
BLOCK_SIZE = 8


def test_mistral_window_matches_transformers_past_the_window(tmp_path: Path, tokenizer_dir: Path) -> None:
    torch.manual_seed(24)
    config = transformers.MistralConfig(vocab_size=49152, num_key_value_heads=2, sliding_window=WINDOW, **SHAPE)
    reference = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.2)
    reference.save_pretrained(str(tmp_path))
    for file in tokenizer_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    llm = LLM(model=str(tmp_path), dtype="float32", quantization="none", kv_cache_memory=2**22, block_size=BLOCK_SIZE)
    assert llm.engine.max_model_len == SHAPE["max_position_embeddings"]  # no longer capped at the window
    token_ids = torch.randint(3, 49152, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        theirs = reference(torch.tensor([token_ids])).logits[0, -1].float()
    ours = paged_last_logits(llm.engine, token_ids, chunk_size=30)
    assert (ours - theirs).abs().max().item() < 1e-3
    engine = llm.engine
    engine.add_request("r", token_ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    (seq,) = engine.requests["r"].sequences
    while engine.has_unfinished_requests():
        engine.step()
        if seq.finish_reason is None:
            held = [block for block in seq.block_ids if block != FREED_BLOCK]
            assert len(held) <= -(-WINDOW // BLOCK_SIZE) + 1
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([token_ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert seq.output_token_ids == expected[0, 100:].tolist()
