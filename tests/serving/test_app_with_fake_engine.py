"""The app in-process over a fake engine: CORS off by default, failed steps as 500 bodies, and the flags."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from transformers import AutoTokenizer

from pagedllm.config import EngineConfig
from pagedllm.errors import RequestTooLongError
from pagedllm.flags import dataclass_from_args
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.serving.api_server import add_arguments, create_app
from pagedllm.serving.generation import default_max_tokens
from pagedllm.serving.settings import API_KEY_ENV, ServerSettings

from .fake_engine import FakeEngine

T = TypeVar("T")


def with_app(scenario: Callable[[httpx.AsyncClient, FakeEngine], Awaitable[T]], **settings: Any) -> T:
    """Run `scenario` against the app over a fake engine whose thread is running, with these ServerSettings."""

    async def main() -> T:
        fake = FakeEngine()
        app: FastAPI = create_app(fake, ServerSettings(**settings))  # type: ignore[arg-type]
        app.state.engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as http:
                return await scenario(http, fake)
        finally:
            await app.state.engine.shutdown()

    return asyncio.run(main())


def test_cors_is_off_without_allowed_origins() -> None:
    async def scenario(http: httpx.AsyncClient, fake: FakeEngine) -> httpx.Response:
        return await http.get("/health", headers={"Origin": "http://anywhere.test"})

    response = with_app(scenario)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_a_failed_step_is_a_500_error_body_and_the_engine_goes_on() -> None:
    async def scenario(
        http: httpx.AsyncClient, fake: FakeEngine
    ) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        fake.fail_next_step = True
        failed = await http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4})
        fake.fail_next_step = True
        streamed = await http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4, "stream": True})
        after = await http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4})
        return failed, streamed, after

    failed, streamed, after = with_app(scenario)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "internal_error"
    assert "request dropped" in failed.json()["error"]["message"]
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "internal_error"
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == "t0 t1 t2 t3 "


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerSettings().api_key == "from-env"
    assert ServerSettings(api_key="flag").api_key == "flag"


def test_flags_come_from_the_config_dataclasses() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for name in [*EngineConfig.field_names(), "host", "port", "api_key", "allowed_origins", "max_queued_sequences"]:
        assert f"--{name.replace('_', '-')}" in help_text
    assert EngineConfig.__dataclass_fields__["max_num_seqs"].metadata["help"] in help_text
    args = parser.parse_args(
        [
            "--max-num-seqs",
            "8",
            "--kv-cache-memory",
            "1e8",
            "--port",
            "9001",
            "--allowed-origins",
            "http://a",
            "http://b",
        ]
    )
    config = dataclass_from_args(EngineConfig, args)
    settings = dataclass_from_args(ServerSettings, args)
    assert (config.max_num_seqs, config.kv_cache_memory, config.model) == (8, 1e8, None)
    assert (settings.port, settings.allowed_origins, settings.host) == (9001, ["http://a", "http://b"], "127.0.0.1")


def test_default_max_tokens_is_the_rest_of_the_context() -> None:
    class Limits:
        max_request_tokens = 100
        max_model_len = 100

    assert default_max_tokens(Limits(), 30, "messages") == 70  # type: ignore[arg-type]
    with pytest.raises(RequestTooLongError, match="the prompt has 100 tokens"):
        default_max_tokens(Limits(), 100, "messages")  # type: ignore[arg-type]


def test_metrics_export_the_weight_and_kv_cache_bytes_and_the_resident_memory() -> None:
    async def scenario(http: httpx.AsyncClient, fake: FakeEngine) -> httpx.Response:
        return await http.get("/metrics")

    text = with_app(scenario).text
    assert 'pagedllm_model_weight_bytes{model_name="fake"} 1000.0' in text
    assert 'pagedllm_model_file_weight_bytes{model_name="fake"} 950.0' in text
    assert 'pagedllm_kv_cache_bytes{model_name="fake"} 2000.0' in text
    gauges = {
        line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("pagedllm_process")
    }
    resident = gauges["pagedllm_process_resident_memory_bytes"]
    assert 2**20 < resident <= gauges["pagedllm_process_peak_resident_memory_bytes"]


def test_chat_without_a_chat_template_is_a_400_and_completions_still_work(
    monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    # A base model, as Gemma 3 270M's GGUF file: its tokenizer has no chat template.
    tokenizer = Tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    tokenizer.chat_template = None
    monkeypatch.setattr(FakeEngine, "tokenizer", tokenizer)

    async def scenario(http: httpx.AsyncClient, fake: FakeEngine) -> tuple[httpx.Response, httpx.Response]:
        chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        completion = await http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        return chat, completion

    chat, completion = with_app(scenario)
    assert chat.status_code == 400
    assert chat.json()["error"]["param"] == "messages"
    assert "no chat template" in chat.json()["error"]["message"]
    assert completion.status_code == 200
