"""Offline prefill and decode throughput of any engine that can generate a fixed number of tokens.

Prefill tok/s at prompt length L is L / (time to generate 1 token from one prompt of L tokens).
Decode tok/s at batch size B is B·(N−1) / (time for N tokens − time for 1 token), so the prefill
cancels out. Every timed call gets fresh random prompts, so a prefix cache cannot help.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pagedllm.benchmarks.datasets import random_requests
from pagedllm.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# generate(prompts, new_tokens) must produce exactly `new_tokens` tokens for every prompt (ignore EOS).
GenerateFn = Callable[[list[list[int]], int], None]

PREFILL_PROMPT_LENS = (128, 512, 2048)
DECODE_BATCH_SIZES = (1, 8, 32)
DECODE_PROMPT_LEN = 32
DECODE_NEW_TOKENS = 128
SHAREGPT_NUM_PROMPTS = 200


@dataclass(frozen=True)
class PrefillPoint:
    prompt_len: int
    tokens_per_s: float


@dataclass(frozen=True)
class DecodePoint:
    batch_size: int
    tokens_per_s: float


@dataclass
class OfflineThroughput:
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)


@dataclass(frozen=True)
class RequestThroughput:
    """Throughput of a set of requests run to completion: requests/s, output tok/s and (prompt + output) tok/s."""

    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float

    @classmethod
    def from_counts(
        cls, num_requests: int, prompt_tokens: int, output_tokens: int, seconds: float
    ) -> RequestThroughput:
        if seconds <= 0:
            raise ValueError(f"elapsed time must be > 0, got {seconds}")
        return cls(
            num_requests,
            prompt_tokens,
            output_tokens,
            seconds,
            num_requests / seconds,
            output_tokens / seconds,
            (prompt_tokens + output_tokens) / seconds,
        )


@dataclass(frozen=True)
class PromptSource:
    """Fresh random prompts for each timed call, reproducible from the seed."""

    vocab_size: int
    excluded_ids: frozenset[int]
    seed: int

    def prompts(self, call: int, batch_size: int, prompt_len: int) -> list[list[int]]:
        requests = random_requests(
            batch_size, prompt_len, 1, self.vocab_size, self.seed * 1_000_003 + call, self.excluded_ids
        )
        return [list(request.prompt) for request in requests]


def int_tuple(text: str) -> tuple[int, ...]:
    """'128,512,2048' → (128, 512, 2048), for comma-list flags."""
    return tuple(int(item) for item in text.split(","))


def timed(generate: GenerateFn, prompts: list[list[int]], new_tokens: int) -> float:
    started = time.perf_counter()
    generate(prompts, new_tokens)
    return time.perf_counter() - started


def measure(
    generate: GenerateFn,
    source: PromptSource,
    prompt_lens: tuple[int, ...] = PREFILL_PROMPT_LENS,
    batch_sizes: tuple[int, ...] = DECODE_BATCH_SIZES,
    repeats: int = 3,
    decode_prompt_len: int = DECODE_PROMPT_LEN,
    decode_new_tokens: int = DECODE_NEW_TOKENS,
    engine: str = "",
) -> OfflineThroughput:
    """Prefill tok/s at each prompt length and decode tok/s at each batch size (medians over `repeats`)."""
    if decode_new_tokens < 2:
        raise ValueError("decode needs at least 2 new tokens to time")
    calls = iter(range(1_000_000))
    # One untimed call pays for lazy initialisation (allocator, kernels, thread pools).
    generate(source.prompts(next(calls), 1, decode_prompt_len), 2)
    result = OfflineThroughput()
    progress = tqdm(
        total=(len(prompt_lens) + 2 * len(batch_sizes)) * repeats, desc=f"offline {engine}".strip(), unit="run"
    )
    for prompt_len in prompt_lens:
        seconds = []
        for _ in range(repeats):
            seconds.append(timed(generate, source.prompts(next(calls), 1, prompt_len), 1))
            progress.update(1)
        result.prefill.append(PrefillPoint(prompt_len, prompt_len / statistics.median(seconds)))
        logger.info("%s prefill %d tokens: %.1f tok/s", engine, prompt_len, result.prefill[-1].tokens_per_s)
    for batch_size in batch_sizes:
        short, long = [], []
        for _ in range(repeats):
            short.append(timed(generate, source.prompts(next(calls), batch_size, decode_prompt_len), 1))
            long.append(timed(generate, source.prompts(next(calls), batch_size, decode_prompt_len), decode_new_tokens))
            progress.update(2)
        decode_s = statistics.median(long) - statistics.median(short)
        result.decode.append(DecodePoint(batch_size, batch_size * (decode_new_tokens - 1) / decode_s))
        logger.info("%s decode batch %d: %.1f tok/s", engine, batch_size, result.decode[-1].tokens_per_s)
    progress.close()
    return result


def measure_from_args(
    generate: GenerateFn, tokenizer: Tokenizer, args: argparse.Namespace, engine: str
) -> OfflineThroughput:
    """`measure` with the offline flags (--prompt-lens, --batch-sizes, --repeats, --decode-tokens, --seed)."""
    source = PromptSource(tokenizer.vocab_size, tokenizer.special_ids, args.seed)
    return measure(
        generate,
        source,
        args.prompt_lens,
        args.batch_sizes,
        args.repeats,
        DECODE_PROMPT_LEN,
        args.decode_tokens,
        engine,
    )
