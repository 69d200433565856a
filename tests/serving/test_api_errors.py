"""Every bad input gets its status and an OpenAI-shaped error body, and none disturbs a request in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from .conftest import ALLOWED_ORIGIN, API_KEY, MAX_BODY_BYTES, MAX_NUM_SEQS, Server

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class BadRequest:
    name: str
    path: str
    body: Any  # a JSON value, or bytes sent as they are
    status: int
    param: str | None = None
    says: str = ""  # a fragment the message must contain
    error_type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": OK_MESSAGES, "max_tokens": 2, **fields}


LOOKAROUND_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


BAD_REQUESTS = [
    BadRequest("malformed JSON", COMPLETIONS, b'{"prompt": "x",', 400, says="not valid JSON"),
    BadRequest("body not an object", COMPLETIONS, [1, 2], 400, says="the body"),
    BadRequest("missing prompt", COMPLETIONS, {"max_tokens": 2}, 400, "prompt", "Field required"),
    BadRequest("prompt of the wrong type", COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    BadRequest("empty prompt list", COMPLETIONS, completion(prompt=[]), 400, "prompt", "empty"),
    BadRequest("empty prompt string", COMPLETIONS, completion(prompt=""), 400, "prompt", "empty"),
    BadRequest("token id outside the vocabulary", COMPLETIONS, completion(prompt=[10**8]), 400, "prompt", "token ids"),
    BadRequest("temperature is a string", COMPLETIONS, completion(temperature="hot"), 400, "temperature", "number"),
    BadRequest("negative temperature", COMPLETIONS, completion(temperature=-0.5), 400, "temperature", "[0, 100]"),
    BadRequest("top_p zero", COMPLETIONS, completion(top_p=0), 400, "top_p", "(0, 1]"),
    BadRequest("top_p above one", CHAT, chat(top_p=1.5), 400, "top_p", "(0, 1]"),
    BadRequest("negative max_tokens", COMPLETIONS, completion(max_tokens=-5), 400, "max_tokens", ">= 1"),
    BadRequest("zero max_completion_tokens", CHAT, chat(max_completion_tokens=0), 400, "max_tokens", ">= 1"),
    BadRequest("max_tokens as a float", COMPLETIONS, completion(max_tokens=2.5), 400, "max_tokens"),
    BadRequest("n zero", COMPLETIONS, completion(n=0), 400, "n", ">= 1"),
    BadRequest("n above max_num_seqs", CHAT, chat(n=MAX_NUM_SEQS + 1), 400, "n", "max_num_seqs"),
    BadRequest("top_k below -1", COMPLETIONS, completion(top_k=-2), 400, "top_k"),
    BadRequest("min_p above one", COMPLETIONS, completion(min_p=1.5), 400, "min_p"),
    BadRequest("presence_penalty above 2", COMPLETIONS, completion(presence_penalty=3), 400, "presence_penalty"),
    BadRequest("frequency_penalty below -2", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    BadRequest("repetition_penalty zero", COMPLETIONS, completion(repetition_penalty=0), 400, "repetition_penalty"),
    BadRequest("empty stop string", COMPLETIONS, completion(stop=[""]), 400, "stop"),
    BadRequest("seed beyond 64 bits", COMPLETIONS, completion(seed=2**64), 400, "seed"),
    BadRequest("seed beyond the sampler's range", COMPLETIONS, completion(seed=2**62), 400, "seed"),
    BadRequest("negative seed", CHAT, chat(seed=-1), 400, "seed"),
    BadRequest("temperature 1e9", COMPLETIONS, completion(temperature=1e9), 400, "temperature", "[0, 100]"),
    BadRequest("temperature 1e308", CHAT, chat(temperature=1e308), 400, "temperature", "[0, 100]"),
    # JSON escapes a lone surrogate in ASCII; Python decodes it into a string no tokenizer takes.
    BadRequest(
        "surrogate in the prompt", COMPLETIONS, b'{"prompt": "\\udc80 hi", "max_tokens": 4}', 400, "prompt", "surrogate"
    ),
    BadRequest(
        "surrogate in a prompt list",
        COMPLETIONS,
        b'{"prompt": ["ok", "\\ud800"], "max_tokens": 2}',
        400,
        "prompt",
        "prompt.1",
    ),
    BadRequest(
        "surrogate in chat content",
        CHAT,
        b'{"messages": [{"role": "user", "content": "a\\udc80"}], "max_tokens": 2}',
        400,
        "messages",
        "messages.0.content",
    ),
    BadRequest(
        "surrogate in a content part",
        CHAT,
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}], "max_tokens": 2}',
        400,
        "messages",
        "surrogate",
    ),
    BadRequest("surrogate in a stop string", CHAT, b'{"messages": [], "stop": ["\\udc80"]}', 400, "stop", "surrogate"),
    BadRequest("surrogate to tokenize", "/tokenize", b'{"prompt": "\\udc80 hi"}', 400, "prompt", "surrogate"),
    BadRequest(
        "surrogate in messages to tokenize",
        "/tokenize",
        b'{"messages": [{"role": "user", "content": "\\udc80"}]}',
        400,
        "messages",
        "surrogate",
    ),
    BadRequest("surrogate in a key", COMPLETIONS, b'{"prompt": "x", "\\udc80": 1}', 400, None, "surrogate"),
    BadRequest("logprobs above 20", COMPLETIONS, completion(logprobs=21), 400, "logprobs", "[0, 20]"),
    BadRequest("top_logprobs above 20", CHAT, chat(logprobs=True, top_logprobs=21), 400, "logprobs", "[0, 20]"),
    BadRequest("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    BadRequest("streamed echo", COMPLETIONS, completion(echo=True, stream=True), 400, "echo", "cannot be streamed"),
    BadRequest("suffix", COMPLETIONS, completion(suffix="!"), 400, "suffix", "not supported"),
    BadRequest("best_of above n streamed", COMPLETIONS, completion(best_of=3, stream=True), 400, "best_of", "stream"),
    BadRequest("best_of below n", CHAT, chat(n=3, best_of=2), 400, "best_of", ">= n"),
    BadRequest("beam search streamed", CHAT, chat(use_beam_search=True, stream=True), 400, "use_beam_search", "stream"),
    BadRequest("beam search with stop", COMPLETIONS, completion(use_beam_search=True, stop=["."]), 400, "stop"),
    BadRequest("logit_bias above 100", COMPLETIONS, completion(logit_bias={"1": 500.0}), 400, "logit_bias", "100"),
    BadRequest("logit_bias key not a token", COMPLETIONS, completion(logit_bias={"x": 1.0}), 400, "logit_bias"),
    BadRequest("logit_bias beyond the vocabulary", CHAT, chat(logit_bias={"99999999": 1.0}), 400, "logit_bias"),
    BadRequest(
        "stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"
    ),
    BadRequest("empty messages", CHAT, chat(messages=[]), 400, "messages", "empty"),
    BadRequest("messages not a list", CHAT, chat(messages="Hi"), 400, "messages"),
    BadRequest("unknown role", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages", "role"),
    BadRequest(
        "image content part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages",
        "only text",
    ),
    BadRequest("tool without a function", CHAT, chat(tools=[{"type": "function"}]), 400, "tools", "function"),
    BadRequest(
        "tool with an invalid parameters schema",
        CHAT,
        chat(tools=[tool("f", {"type": "object", "properties": {"x": {"type": "integr"}}})]),
        400,
        "tools",
        "tool 'f' has invalid parameters",
    ),
    BadRequest(
        "tool_choice naming an unknown function",
        CHAT,
        chat(tools=[tool("f")], tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "tool_choice",
        "'g'",
    ),
    BadRequest("tool_choice without tools", CHAT, chat(tool_choice="required"), 400, "tool_choice", "needs tools"),
    BadRequest("1,000 tools", CHAT, chat(tools=[tool(f"f{i}") for i in range(1000)]), 400, "tools", "at most 128"),
    BadRequest(
        "invalid JSON schema",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
        400,
        "json",
        "Invalid type",
    ),
    BadRequest(
        "unsupported schema feature",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": LOOKAROUND_SCHEMA}}),
        400,
        "json",
        "look-around",
    ),
    BadRequest(
        "unsupported regex feature",
        COMPLETIONS,
        completion(structured_outputs={"regex": "(a)\\1"}),
        400,
        "regex",
        "backreferences are not supported",
    ),
    BadRequest(
        "two structured_outputs kinds",
        COMPLETIONS,
        completion(structured_outputs={"regex": "a", "choice": ["a"]}),
        400,
        "structured_outputs",
        "exactly one",
    ),
    BadRequest(
        "unknown structured_outputs field",
        CHAT,
        chat(structured_outputs={"xml": "<a/>"}),
        400,
        "structured_outputs",
        "xml",
    ),
    BadRequest(
        "response_format of an unknown type", CHAT, chat(response_format={"type": "yaml"}), 400, "response_format"
    ),
    BadRequest(
        "json_schema without a schema",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "response_format",
    ),
    BadRequest(
        "prompt + max_tokens beyond the context",
        COMPLETIONS,
        completion(max_tokens=9000),
        400,
        "max_tokens",
        "context is 8192 tokens, but the prompt has 1 and max_tokens is 9000",
    ),
    BadRequest(
        "chat prompt + max_tokens beyond the context",
        CHAT,
        chat(max_tokens=8190),
        400,
        "max_tokens",
        "8192",
    ),
    BadRequest("unknown model", COMPLETIONS, completion(model="gpt-4o"), 404, "model", "gpt-4o", "not_found_error"),
    BadRequest("unknown model in chat", CHAT, chat(model="nope"), 404, "model", "does not exist", "not_found_error"),
    BadRequest("tokenize without input", "/tokenize", {}, 400, "prompt", "exactly one"),
    BadRequest("detokenize outside the vocabulary", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    BadRequest("max_tokens 0 without echo", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens", "echo"),
    BadRequest("no such route", "/v1/nothing", {}, 404, error_type="not_found_error"),
    BadRequest(
        "no API key",
        COMPLETIONS,
        completion(),
        401,
        says="API key",
        error_type="authentication_error",
        headers={"Authorization": ""},
    ),
    BadRequest(
        "wrong API key",
        CHAT,
        chat(),
        401,
        says="API key",
        error_type="authentication_error",
        headers={"Authorization": "Bearer wrong"},
    ),
    BadRequest(
        "body over the limit", COMPLETIONS, completion(prompt="x" * MAX_BODY_BYTES), 413, says=str(MAX_BODY_BYTES)
    ),
]


def send(server: Server, case: BadRequest) -> httpx.Response:
    headers = {**server.auth, "Content-Type": "application/json", **case.headers}
    headers = {name: value for name, value in headers.items() if value}
    content = case.body if isinstance(case.body, bytes) else None
    json_body = None if isinstance(case.body, bytes) else case.body
    return httpx.post(f"{server.base_url}{case.path}", content=content, json=json_body, headers=headers, timeout=60)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.name for case in BAD_REQUESTS])
def test_bad_request_gets_status_and_error_body(server: Server, case: BadRequest) -> None:
    response = send(server, case)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == case.error_type
    assert error["param"] == case.param
    assert case.says in error["message"]


def test_bad_requests_do_not_disturb_a_running_stream(server: Server, model_name: str) -> None:
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {
            "model": model_name,
            "prompt": "One, two, three,",
            "max_tokens": 32,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{server.base_url}{COMPLETIONS}", json=body, headers=server.auth, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    for case in BAD_REQUESTS:
        assert send(server, case).status_code == case.status
    reader.join(120)
    assert lines[-1] == "data: [DONE]"
    assert sum('"finish_reason":"length"' in line for line in lines) == 1
    assert not any('"error"' in line for line in lines)


def test_method_not_allowed_is_an_error_body(server: Server) -> None:
    response = httpx.get(f"{server.base_url}{COMPLETIONS}", headers=server.auth, timeout=10)
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_health_stays_open_and_the_api_does_not(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code == 401
    assert (
        httpx.get(
            f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        ).status_code
        == 200
    )
    assert httpx.get(f"{server.base_url}/", timeout=10).status_code == 200


def test_cors_allows_only_the_configured_origin(server: Server) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(f"{server.base_url}{CHAT}", headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=10)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.options(f"{server.base_url}{CHAT}", headers={"Origin": "http://evil.test", **preflight}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_a_streamed_body_over_the_limit_is_refused(server: Server) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    headers = {**server.auth, "Content-Type": "application/json"}
    response = httpx.post(f"{server.base_url}{COMPLETIONS}", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("the request body is larger than")
