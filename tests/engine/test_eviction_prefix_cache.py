"""Evicting KV-cache policies with the prefix cache: a compaction never rewrites a block that another sequence
shares or that the prefix cache lists; it writes into a private copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from tests.engine.eviction import random_tokens

POLICIES: dict[str, dict[str, Any]] = {
    "streaming": dict(kv_cache_policy="streaming", attention_sinks=4, kv_window=12),
    "h2o": dict(kv_cache_policy="h2o", kv_budget=16),
}
COMMON = dict(
    dtype="float32",
    quantization="none",
    block_size=4,
    max_model_len=64,
    kv_cache_memory=2**22,
    max_num_batched_tokens=16,
)
PARAMS = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)


def after_a_warm_up(folder: Path, policy: str, warm_up: list[int], prompt: list[int]) -> list[int]:
    """The tokens `prompt` gets in a fresh engine whose prefix cache holds what a one-token request for `warm_up`
    left there (its blocks never compacted)."""
    llm = LLM(str(folder), **COMMON, **POLICIES[policy], enable_prefix_caching=True)
    llm.generate([warm_up], SamplingParams(max_tokens=1), use_tqdm=False)
    [output] = llm.generate([prompt], PARAMS, use_tqdm=False)
    assert output.num_cached_tokens == 12
    return list(output.outputs[0].token_ids)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_shared_prefix_blocks_survive_the_compactions_of_the_sequences_sharing_them(
    tiny_llama_dir: Path, policy: str
) -> None:
    """b adopts a's cached prompt blocks before a's first eviction, both compact while sharing them, and c finds
    them in the cache afterwards: b and c get the tokens they get from the same prefix cached by a request that never
    compacts (under h2o a cached prefix's tokens start with no accumulated attention, so without a prefix cache the
    kept tokens could differ)."""
    llm = LLM(str(tiny_llama_dir), **COMMON, **POLICIES[policy], enable_prefix_caching=True)
    engine = llm.engine
    prompt = random_tokens(14, 7)
    prompts = {"a": prompt, "b": prompt + random_tokens(3, 8), "c": prompt}
    outputs: dict[str, list[int]] = {}

    def run(*request_ids: str) -> None:
        while any(request_id not in outputs for request_id in request_ids):
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id] = list(output.outputs[0].token_ids)

    engine.add_request("a", prompts["a"], PARAMS)
    engine.step()  # a's prompt is computed: its 3 full blocks enter the prefix cache
    seq_a = engine.requests["a"].sequences[0]
    engine.add_request("b", prompts["b"], PARAMS)
    request_b = engine.requests["b"]
    run("a", "b")
    engine.add_request("c", prompts["c"], PARAMS)
    request_c = engine.requests["c"]
    run("c")
    assert seq_a.num_evicted_tokens > 0 and request_b.sequences[0].num_evicted_tokens > 0
    assert request_b.num_cached_tokens == request_c.num_cached_tokens == 12
    for request_id in ("b", "c"):
        assert outputs[request_id] == after_a_warm_up(tiny_llama_dir, policy, prompt, prompts[request_id]), request_id
    assert engine.block_manager.num_free_blocks == engine.num_blocks
