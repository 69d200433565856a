"""Settings and helpers of the evicting KV-cache policies' tests (streaming and h2o) on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.arithmetic import ceil_div
from pagedllm.engine.model_runner import kv_cache_bytes_per_block
from pagedllm.model.loader import load_checkpoint

SINKS, WINDOW, BUDGET, BLOCK, MAX_MODEL_LEN = 4, 16, 16, 4, 64
FLOAT32 = dict(dtype="float32", quantization="none", enable_prefix_caching=False)
STREAMING = dict(
    kv_cache_policy="streaming", attention_sinks=SINKS, kv_window=WINDOW, block_size=BLOCK, max_model_len=MAX_MODEL_LEN
)
H2O = dict(kv_cache_policy="h2o", kv_budget=BUDGET, block_size=BLOCK, max_model_len=MAX_MODEL_LEN)
# The most blocks a decoding sequence holds under each policy.
STREAMING_BOUND = ceil_div(SINKS + WINDOW, BLOCK) + 1
H2O_BOUND = ceil_div(BUDGET, BLOCK) + 1
GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny(folder: Path, **settings: Any) -> LLM:
    return LLM(str(folder), **{**FLOAT32, "kv_cache_memory": 2**22, **settings})


def tiny_with_blocks(folder: Path, num_blocks: int, **settings: Any) -> LLM:
    """`tiny` with a KV cache of exactly `num_blocks` float32 blocks of BLOCK tokens, steps of 8 tokens at most."""
    config = load_checkpoint(folder, torch.float32).config
    block_bytes = kv_cache_bytes_per_block(config, BLOCK, torch.float32)
    return tiny(folder, kv_cache_memory=num_blocks * block_bytes, max_num_batched_tokens=8, **settings)


def random_tokens(count: int, seed: int) -> list[int]:
    return torch.randint(0, 49152, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def streamed_logprobs(llm: LLM, token_ids: list[int]) -> list[float]:
    """The logprob of each token but the first, the stream fed one token per step (max_num_batched_tokens=1)."""
    [output] = llm.generate([token_ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    assert output.prompt_logprobs is not None
    return [entry[token] for entry, token in zip(output.prompt_logprobs[1:], token_ids[1:], strict=True)]


def streaming_kept(num_tokens: int) -> list[list[int]]:
    """For each position p, the positions of the tokens the streaming cache holds when p is the query: the sinks
    and the window before it, a block's worth leaving at once (kv_cache_policy.py)."""
    kept, cache_len = [], 0
    for p in range(num_tokens):
        if cache_len - SINKS - (WINDOW - 1) >= BLOCK:
            cache_len = SINKS + WINDOW - 1
        evicted = p - cache_len
        kept.append([*range(SINKS), *range(SINKS + evicted, p + 1)] if evicted else list(range(p + 1)))
        cache_len += 1
    return kept
