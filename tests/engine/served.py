"""Greedy completions with logprobs served by the OpenAI server over an engine, all requests at once."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from pagedllm import LLM
from pagedllm.serving.api_server import create_app
from pagedllm.serving.settings import ServerSettings
from tests.logprobs_close import NUM_LOGPROBS


def served_greedy(llm: LLM, prompts: list[str] | list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    """Each prompt's completions `logprobs` object (top NUM_LOGPROBS), the requests sent concurrently; the server
    shuts the engine down as it stops."""

    async def scenario() -> list[dict[str, Any]]:
        app = create_app(llm.engine, ServerSettings())
        app.state.engine.start()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
                bodies = [
                    {
                        "prompt": p,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                        "logprobs": NUM_LOGPROBS,
                    }
                    for p in prompts
                ]
                answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))
                assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
                return [answer.json()["choices"][0]["logprobs"] for answer in answers]
        finally:
            await app.state.engine.shutdown()

    return asyncio.run(scenario())
