"""`pagedllm bench offline`: engine flags mirror EngineConfig; the generate adapter checks lengths."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from pagedllm.benchmarks import offline
from pagedllm.benchmarks.datasets import BenchmarkRequest
from pagedllm.benchmarks.throughput import RequestThroughput


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_flags_become_the_engine_config() -> None:
    args = parse(
        "--batch-sizes", "1,512", "--prompt-lens", "128,4096", "--block-size", "32", "--kv-cache-memory", "0.25"
    )
    config = offline.engine_config(args)
    assert (config.block_size, config.kv_cache_memory, config.model, config.seed) == (32, 0.25, None, 0)
    # Raised to what batch 512 and a 4096-token prefill need, past the defaults.
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (512, 512 * offline.DECODE_PROMPT_LEN)


def test_budgets_are_the_larger_of_the_flag_and_the_need() -> None:
    config = offline.engine_config(
        parse("--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--prompt-lens", "128")
    )
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (32, 32 * offline.DECODE_PROMPT_LEN)
    config = offline.engine_config(parse("--max-num-seqs", "100", "--max-num-batched-tokens", "9000"))
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (100, 9000)


def test_bool_engine_flags_and_benchmark_flags() -> None:
    args = parse(
        "--no-enable-prefix-caching",
        "--model",
        "m.gguf",
        "--seed",
        "3",
        "--num-prompts",
        "5",
        "--sharegpt-output-len",
        "7",
    )
    config = offline.engine_config(args)
    # --seed is the benchmark's, and also seeds the (greedy, so unused) engine sampler.
    assert (config.enable_prefix_caching, config.model, config.seed) == (False, "m.gguf", 3)
    assert (args.num_prompts, args.sharegpt_output_len) == (5, 7)
    defaults = parse()
    assert (defaults.num_prompts, defaults.sharegpt_output_len) == (200, None)
    assert offline.engine_config(defaults).enable_prefix_caching


class FakeLLM:
    def __init__(self, produced: int) -> None:
        self.produced = produced
        self.params = None

    def generate(self, prompts: list[list[int]], params: object, use_tqdm: bool = False) -> list[SimpleNamespace]:
        self.params = params
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * self.produced)]) for _ in prompts]


class FakePerRequestLLM:
    """Produces each request's max_tokens and spends one fake second per call."""

    def __init__(self) -> None:
        self.now = 0.0
        self.params: list = []

    def generate(self, prompts: list[list[int]], params: list, use_tqdm: bool = False) -> list[SimpleNamespace]:
        self.params = params
        self.now += 2.0
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * p.max_tokens)]) for p in params]


def test_generate_adapter_asks_for_fixed_greedy_lengths() -> None:
    llm = FakeLLM(produced=5)
    offline.engine_generate_fn(llm)([[1, 2], [3, 4]], 5)
    assert (llm.params.max_tokens, llm.params.temperature, llm.params.ignore_eos) == (5, 0.0, True)
    with pytest.raises(RuntimeError, match="generated 5 tokens, not 6"):
        offline.engine_generate_fn(llm)([[1, 2]], 6)


def test_sharegpt_requests_are_submitted_at_once_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = FakePerRequestLLM()
    monkeypatch.setattr(offline.time, "perf_counter", lambda: llm.now)
    requests = [BenchmarkRequest([1, 2, 3], 3, 5), BenchmarkRequest([4, 5], 2, 3)]
    result = offline.run_requests(llm, requests)
    assert [(p.max_tokens, p.temperature, p.ignore_eos) for p in llm.params] == [(5, 0.0, True), (3, 0.0, True)]
    assert result == RequestThroughput.from_counts(2, 5, 8, 2.0)
