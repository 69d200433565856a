"""The server over worker ranks: it answers as the engine does, then 503 within seconds once a rank dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from pagedllm import LLM, SamplingParams
from pagedllm.serving.api_server import create_app
from pagedllm.serving.settings import ServerSettings

DEAD_WORKER_DEADLINE_S = 10.0


def check_server_answers_then_503_after(llm: LLM, prompt: list[int], kill_a_rank: Callable[[], None]) -> None:
    """A completion equal to the engine's; after `kill_a_rank`, a long one gets 503 within the deadline, and so
    does /health."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = llm.generate([prompt], params)[0].outputs[0].text
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    async def scenario() -> None:
        app = create_app(llm.engine, ServerSettings())
        app.state.engine.start()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
                answer = await http.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"] == expected
                kill_a_rank()
                started = time.monotonic()
                failed = await http.post("/v1/completions", json={**body, "max_tokens": 400})
                assert failed.status_code == 503, failed.text
                assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S
                assert (await http.get("/health")).status_code == 503
        finally:
            await app.state.engine.shutdown()

    asyncio.run(scenario())
