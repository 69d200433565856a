"""Speculation over sliding-window layers (a tiny random Gemma 3, window of 32 tokens): greedy outputs past the
window are those without speculation, the second time with the prompts from the prefix cache, for n-gram and suffix
drafts, on plain completion prompts (a model without a chat template)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.speculative import build_requests
from tests.model.test_gemma3 import write_tiny_gemma3

WINDOW = 32
MAX_TOKENS = 48
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None},
    "suffix": {"method": "suffix", "num_speculative_tokens": 4, "disable_by_batch_size": None},
}


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gemma3-window")
    write_tiny_gemma3(folder, tokenizer_dir, sliding_window=WINDOW)
    return folder


@pytest.fixture(scope="module")
def prompts(tiny_gemma3_dir: Path) -> list[list[int]]:
    """Four ShareGPT replies handed back as plain completion text, each longer than the window."""
    plain = LLM(model=str(tiny_gemma3_dir), dtype="float32", kv_cache_memory=2**22)
    with sharegpt_path() as path:
        pairs = load_sharegpt_pairs(path)
    requests = build_requests(pairs, "grounded", 4, plain.tokenizer, 3, max_reply_tokens=64, prompt_format="completion")
    assert all(len(request.prompt_token_ids) > 2 * WINDOW for request in requests)
    return [request.prompt_token_ids for request in requests]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_outputs_past_the_window_are_those_without_speculation(
    method: str, tiny_gemma3_dir: Path, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    plain = LLM(model=str(tiny_gemma3_dir), dtype="float32", kv_cache_memory=2**22)
    expected = [output.outputs[0].token_ids for output in plain.generate(prompts, params)]

    config = METHODS[method]
    speculating = LLM(model=str(tiny_gemma3_dir), dtype="float32", kv_cache_memory=2**22, speculative_config=config)
    for _ in range(2):  # the second time, the prompts' blocks come from the prefix cache
        assert [output.outputs[0].token_ids for output in speculating.generate(prompts, params)] == expected
    stats = speculating.engine.stats()
    assert stats.prefix_cache_hit_tokens > 0 and stats.spec_decode.num_accepted_tokens > 0
