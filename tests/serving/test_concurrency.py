"""Many clients at once: independent outputs, disconnects that free the KV cache, and the queue bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import openai

from pagedllm import LLM, SamplingParams

from .conftest import MAX_QUEUED_SEQUENCES, Server

QUESTIONS = [
    "What is the capital of Italy?",
    "Name a large animal.",
    "What color is the sky?",
    "Give me a fruit.",
    "What is 2 plus 2?",
    "Name a planet.",
    "What do bees make?",
    "Name a musical instrument.",
    "What is ice made of?",
    "Name a programming language.",
    "Where do penguins live?",
    "Name a month.",
    "What is the opposite of hot?",
    "Name a flower.",
    "How many legs does a spider have?",
    "Name an ocean.",
]
MAX_TOKENS = 8


async def stream_chat(
    client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int, **extra: object
) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        **extra,
    )
    text, finish_reason = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
    return text, finish_reason


def offline_chat(llm: LLM, question: str, max_tokens: int, ignore_eos: bool = False) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return llm.chat([{"role": "user", "content": question}], params)[0].outputs[0].text


def test_sixteen_concurrent_streams_equal_one_at_a_time(
    async_client_factory: Callable[[], openai.AsyncOpenAI], model_name: str, llm: LLM
) -> None:
    expected = [offline_chat(llm, question, MAX_TOKENS) for question in QUESTIONS]

    async def all_at_once() -> list[tuple[str, str | None]]:
        async with async_client_factory() as client:
            return await asyncio.gather(*(stream_chat(client, model_name, q, MAX_TOKENS) for q in QUESTIONS))

    results = asyncio.run(all_at_once())
    assert [text for text, _ in results] == expected
    assert all(finish in ("stop", "length") for _, finish in results)
    assert len(set(expected)) > 8  # the prompts really differ, so equal outputs show independence


def test_disconnect_aborts_the_request_and_frees_its_blocks(
    server: Server, async_client_factory: Callable[[], openai.AsyncOpenAI], model_name: str, llm: LLM
) -> None:
    keeper_question, keeper_tokens, victim_tokens = "Count from one to twenty.", 24, 400
    expected = offline_chat(llm, keeper_question, keeper_tokens, ignore_eos=True)
    before = server.wait_until_idle()

    async def scenario() -> tuple[str, str | None]:
        async with async_client_factory() as client:
            victim = await client.completions.create(
                model=model_name,
                prompt="Tell me a very long story.",
                max_tokens=victim_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            keeper = asyncio.create_task(
                stream_chat(client, model_name, keeper_question, keeper_tokens, extra_body={"ignore_eos": True})
            )
            received = 0
            async for _ in victim:
                received += 1
                if received == 3:
                    break
            await victim.close()
            return await keeper

    text, finish_reason = asyncio.run(scenario())
    assert (text, finish_reason) == (expected, "length")
    after = server.wait_until_idle()
    generated = after["pagedllm_generation_tokens_total"] - before["pagedllm_generation_tokens_total"]
    assert generated < keeper_tokens + victim_tokens // 2, f"the abandoned request kept generating ({generated} tokens)"
    aborted = "pagedllm_requests_finished_total{finish_reason=abort}"
    assert after[aborted] - before.get(aborted, 0) == 1


def test_full_queue_answers_503_with_retry_after(server: Server, model_name: str) -> None:
    burst = 3 * MAX_QUEUED_SEQUENCES
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 1}

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=burst)
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.auth, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(burst)))

    responses = asyncio.run(flood())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [response for response in responses if response.status_code == 503]
    assert refused, "no request was refused although the burst is three times the queue bound"
    assert statuses.count(200) >= MAX_QUEUED_SEQUENCES
    for response in refused:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "server_overloaded"
    server.wait_until_idle()
