"""A server with --speculative-config answers greedy chat requests with the text the model gives without
speculation, and /metrics counts the drafts it verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.speculative import grounded_prompt

from .conftest import ARTIFACTS, REPO_ROOT, SHUTDOWN_TIMEOUT_S, Server, free_port, wait_until_healthy

MAX_TOKENS = 32
SPECULATIVE_CONFIG = {"method": "suffix", "num_speculative_tokens": 5}


@pytest.fixture(scope="module")
def speculative_server() -> Iterator[Server]:
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / "speculative-test-server.log"
    command = [
        *(sys.executable, "-m", "pagedllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--kv-cache-memory", str(2**27), "--dtype", "float32", "--quantization", "none"),
        *("--speculative-config", json.dumps(SPECULATIVE_CONFIG)),
    ]
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


def test_a_bad_speculative_config_is_one_line_at_start_up() -> None:
    command = [sys.executable, "-m", "pagedllm.cli", "serve", "--speculative-config", '{"method": "eagle"}']
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode != 0
    assert "speculative_config.method must be one of" in result.stderr
