"""A server with --speculative-config answers greedy requests with the text the model gives without speculation,
and /metrics counts the drafts it verified: on the embedded model (suffix, chat), and for every method (n-gram,
suffix, a draft model, int4 self-speculation) on ShareGPT prompts with a KV cache so small that requests preempt
each other, then with a prompt served from the prefix cache. The tiny random Llama runs every method in the default
run; the embedded model runs n-gram and int4 self-speculation so under `-m slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.speculative import build_requests, grounded_prompt
from pagedllm.model.registry import DEFAULT_MODEL

from .conftest import ARTIFACTS, REPO_ROOT, SHUTDOWN_TIMEOUT_S, Server, free_port, wait_until_healthy

MAX_TOKENS = 32
SPECULATIVE_CONFIG = {"method": "suffix", "num_speculative_tokens": 5}
# Placeholders for the paths of the model served and of its draft, known once their fixtures have run.
TARGET, DRAFT = "<target>", "<draft>"
# disable_by_batch_size None: the four requests at once draft as much as one alone would.
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None},
    "suffix": {"method": "suffix", "num_speculative_tokens": 4, "disable_by_batch_size": None},
    "draft_model": {
        "method": "draft_model",
        "model": DRAFT,
        "num_speculative_tokens": 4,
        "disable_by_batch_size": None,
    },
    "int4_self_speculation": {
        "method": "draft_model",
        "model": TARGET,
        "quantization": "int4",
        "num_speculative_tokens": 4,
        "disable_by_batch_size": None,
    },
}
# The tiny Llama's K/V for a block of 16 tokens in float32 is 8 KiB: 12 blocks hold two of its prompts at once, not
# their outputs. The embedded model's cache of about 20 blocks holds two of its prompts.
TINY_KV_BYTES = 12 * 8 * 2**10
EMBEDDED_KV_BYTES = 15 * 2**20
BLOCK_SIZE = 16


@contextmanager
def serving(arguments: list[str], log_name: str) -> Iterator[Server]:
    """`pagedllm serve` with the arguments on a free port, on one torch thread, until the block ends."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / log_name
    command = [sys.executable, "-m", "pagedllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    handle = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until_healthy(handle)
        yield handle
    finally:
        process.terminate()
        process.wait(SHUTDOWN_TIMEOUT_S)


def speculative_config(method: str, target: str, draft: str) -> str:
    """The method's config as JSON, with the target's and the draft's paths in place."""
    paths = {TARGET: target, DRAFT: draft}
    return json.dumps({name: paths.get(value, value) for name, value in METHODS[method].items()})


def kv_cache_memory(method: str, bytes_per_cache: int) -> int:
    """A draft model's K/V takes a block of its own for every block id: as many blocks take twice the bytes."""
    return bytes_per_cache * (2 if METHODS[method]["method"] == "draft_model" else 1)


@pytest.fixture(scope="module")
def speculative_server() -> Iterator[Server]:
    arguments = [
        *("--kv-cache-memory", str(2**27), "--dtype", "float32", "--quantization", "none"),
        *("--speculative-config", json.dumps(SPECULATIVE_CONFIG)),
    ]
    with serving(arguments, "speculative-test-server.log") as server:
        yield server


def test_greedy_chat_is_the_same_and_drafts_are_counted(speculative_server: Server, llm: LLM) -> None:
    with sharegpt_path() as path:
        replies = [reply for _, reply in load_sharegpt_pairs(path)[:40] if 200 < len(reply) < 600][:3]
    for index, reply in enumerate(replies):
        messages = [{"role": "user", "content": grounded_prompt(reply, index)}]
        expected = llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0].outputs[0].text
        body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        response = httpx.post(f"{speculative_server.base_url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected
    metrics = speculative_server.metrics()
    assert metrics["pagedllm_spec_decode_num_draft_tokens_total"] > 0
    assert 0 < metrics["pagedllm_spec_decode_num_accepted_tokens_total"]
    assert (
        metrics["pagedllm_spec_decode_num_accepted_tokens_total"]
        <= metrics["pagedllm_spec_decode_num_draft_tokens_total"]
    )
    assert 0 < metrics["pagedllm_spec_decode_acceptance_rate"] <= 1
    assert metrics["pagedllm_spec_decode_mean_accepted_length"] > 1


def grounded_prompts(reference: LLM, max_reply_tokens: int) -> list[list[int]]:
    """Four ShareGPT replies handed back to be repeated or edited, chat-templated token ids."""
    with sharegpt_path() as path:
        requests = build_requests(load_sharegpt_pairs(path), "grounded", 4, reference.tokenizer, 3, max_reply_tokens)
    return [request.prompt_token_ids for request in requests]


def complete(server: Server, prompt: list[int] | list[list[int]]) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def check_outputs_through_preemption_and_the_prefix_cache(
    server: Server, reference: LLM, prompts: list[list[int]]
) -> None:
    """The prompts in one request (they enter the engine together and preempt each other), then the first prompt
    twice (the second time its full blocks come from the prefix cache): every text as the reference's, without
    speculation."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    expected = [output.outputs[0].text for output in reference.generate(prompts, params)]
    choices = sorted(complete(server, prompts)["choices"], key=lambda choice: choice["index"])
    assert [choice["text"] for choice in choices] == expected
    metrics = server.metrics()
    assert metrics["pagedllm_num_preemptions_total"] > 0, server.log_tail()
    assert metrics["pagedllm_spec_decode_num_accepted_tokens_total"] > 0

    for _ in range(2):
        again = complete(server, prompts[0])
        assert again["choices"][0]["text"] == expected[0]
    full_blocks = len(prompts[0]) // BLOCK_SIZE * BLOCK_SIZE
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= full_blocks - BLOCK_SIZE
    after = server.metrics()  # the cached request drafted too
    assert after["pagedllm_spec_decode_num_draft_tokens_total"] > metrics["pagedllm_spec_decode_num_draft_tokens_total"]


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama_dir: Path) -> LLM:
    return LLM(model=str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=2**22)


@pytest.fixture(scope="module", params=list(METHODS))
def tiny_server(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_llama_draft_dir: Path) -> Iterator[Server]:
    method = request.param
    arguments = [
        *("--model", str(tiny_llama_dir), "--dtype", "float32", "--quantization", "none"),
        *("--quant-group-size", "32", "--kv-cache-memory", str(kv_cache_memory(method, TINY_KV_BYTES))),
        *("--speculative-config", speculative_config(method, str(tiny_llama_dir), str(tiny_llama_draft_dir))),
    ]
    with serving(arguments, f"speculative-{method}-tiny-test-server.log") as server:
        yield server


def test_every_method_serves_the_outputs_of_no_speculation_through_preemption_and_the_prefix_cache(
    tiny_server: Server, tiny_reference: LLM
) -> None:
    prompts = grounded_prompts(tiny_reference, max_reply_tokens=32)
    check_outputs_through_preemption_and_the_prefix_cache(tiny_server, tiny_reference, prompts)


@pytest.fixture(
    scope="module",
    params=[pytest.param(method, marks=pytest.mark.slow) for method in ("ngram", "int4_self_speculation")],
)
def embedded_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    method = request.param
    arguments = [
        *("--dtype", "float32", "--quantization", "none"),
        *("--kv-cache-memory", str(kv_cache_memory(method, EMBEDDED_KV_BYTES))),
        *("--speculative-config", speculative_config(method, DEFAULT_MODEL, DEFAULT_MODEL)),
    ]
    with serving(arguments, f"speculative-{method}-embedded-test-server.log") as server:
        yield server


def test_the_embedded_model_serves_the_outputs_of_no_speculation_through_preemption_and_the_prefix_cache(
    embedded_server: Server, llm: LLM
) -> None:
    prompts = grounded_prompts(llm, max_reply_tokens=64)
    check_outputs_through_preemption_and_the_prefix_cache(embedded_server, llm, prompts)


def test_a_bad_speculative_config_is_one_line_at_start_up() -> None:
    command = [sys.executable, "-m", "pagedllm.cli", "serve", "--speculative-config", '{"method": "eagle"}']
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode != 0
    assert "speculative_config.method must be one of" in result.stderr
