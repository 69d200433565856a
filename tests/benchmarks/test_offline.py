"""`pagedllm bench offline`: engine flags mirror EngineConfig; the generate adapter checks lengths."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from pagedllm.benchmarks import offline
from pagedllm.config import EngineConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_flags_become_a_valid_engine_config() -> None:
    args = parse("--batch-sizes", "1,64", "--prompt-lens", "128,4096", "--block-size", "32", "--kv-cache-memory", "0.25")
    settings = offline.engine_settings(args)
    assert settings == {"block_size": 32, "kv_cache_memory": 0.25, "max_num_seqs": 64, "max_num_batched_tokens": 4096}
    EngineConfig.from_kwargs(**settings)


def test_explicit_budgets_win() -> None:
    settings = offline.engine_settings(parse("--max-num-seqs", "8", "--max-num-batched-tokens", "512"))
    assert (settings["max_num_seqs"], settings["max_num_batched_tokens"]) == (8, 512)


class FakeLLM:
    def __init__(self, produced: int) -> None:
        self.produced = produced
        self.params = None

    def generate(self, prompts: list[list[int]], params: object) -> list[SimpleNamespace]:
        self.params = params
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * self.produced)]) for _ in prompts]


def test_generate_adapter_asks_for_fixed_greedy_lengths() -> None:
    llm = FakeLLM(produced=5)
    offline.engine_generate_fn(llm)([[1, 2], [3, 4]], 5)
    assert (llm.params.max_tokens, llm.params.temperature, llm.params.ignore_eos) == (5, 0.0, True)
    with pytest.raises(RuntimeError, match="generated 5 tokens, not 6"):
        offline.engine_generate_fn(llm)([[1, 2]], 6)
