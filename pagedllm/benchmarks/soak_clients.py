"""The clients of the soak suite: what each kind sends, how it reads the answer, and what it saw."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
STOP_STRINGS = (["\n\n"], ["."], [" the", "\n"])
# Requests the server must refuse with a 4xx and an error body, whatever the load.
BAD_BODIES: tuple[bytes, ...] = (
    b'{"prompt": "\\udc80 hi", "max_tokens": 4}',
    b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 4}',
    b'{"prompt": "hi", "temperature": 1e308}',
    b'{"prompt": "hi", "seed": -1}',
    b'{"prompt": "hi", "n": 100000}',
    b'{"prompt": "hi", "max_tokens": 1e400}',
    b'{"prompt": "hi",',
    b'{"messages": []}',
    b'{"prompt": "hi", "max_tokens": 100000}',
    json.dumps({"prompt": [[1, 2]] * 300, "max_tokens": 1}).encode(),
    json.dumps({"messages": [{"role": "user"}] * 5000, "max_tokens": 1}).encode(),
)
KINDS = ("chat_stream", "completion", "disconnect", "slow", "bad", "greedy")


@dataclass
class Outcome:
    """What one client saw."""

    kind: str
    status: int | None = None
    finished: bool = False  # every choice reported a finish reason
    aborted: bool = False  # the client left on purpose
    error_type: str | None = None  # from an error body or a stream's error event
    usage_tokens: int | None = None
    streamed_tokens: int | None = None
    text: str | None = None
    body: dict[str, Any] | None = None
    max_gap_s: float = 0.0  # the longest wait for the next event
    problems: list[str] = field(default_factory=list)  # protocol violations


GREEDY_EVERY = 20  # one request in 20 is greedy, to be replayed alone


def choose_kind(index: int, rng: random.Random) -> str:
    if index % GREEDY_EVERY == 0:
        return "greedy"
    return rng.choices(KINDS[:-1], weights=(50, 20, 10, 5, 10))[0]


def chat_body(prompt: str, rng: random.Random, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "n": rng.choice((1, 2, 3)),
        "temperature": rng.choice((0.7, 1.0)),
        "seed": rng.randrange(2**31),
        "logprobs": True,
        "top_logprobs": rng.choice((0, 2)),
        "stream": stream,
    }
    if rng.random() < 0.4:
        body["stop"] = rng.choice(STOP_STRINGS)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def run_client(http: httpx.AsyncClient, kind: str, prompt: str, rng: random.Random, max_tokens: int) -> Outcome:
    """Send one request of `kind` and report what came back; never raises for what the server does."""
    outcome = Outcome(kind)
    try:
        if kind == "bad":
            await _bad(http, rng, outcome)
        elif kind == "completion":
            await _completion(http, prompt, rng, max_tokens, outcome)
        elif kind == "greedy":
            await _greedy(http, prompt, max_tokens, outcome)
        else:
            leave_after = rng.randint(1, 4) if kind == "disconnect" else None
            pause_s = 0.1 if kind == "slow" else 0.0
            await _chat_stream(http, chat_body(prompt, rng, max_tokens, True), outcome, leave_after, pause_s)
    except httpx.HTTPError as error:
        outcome.problems.append(f"transport error: {type(error).__name__}: {error}")
    return outcome


async def greedy_alone(http: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
    """The text of a greedy request sent on its own."""
    response = await http.post(CHAT_PATH, json=body)
    return response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None


def greedy_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}


async def _bad(http: httpx.AsyncClient, rng: random.Random, outcome: Outcome) -> None:
    path = rng.choice((CHAT_PATH, COMPLETIONS_PATH))
    content = rng.choice(BAD_BODIES)
    response = await http.post(path, content=content, headers={"Content-Type": "application/json"})
    outcome.status = response.status_code
    _read_error(response, outcome)
    if not 400 <= response.status_code < 500:
        outcome.problems.append(f"bad input answered {response.status_code}: {response.text[:200]}")


async def _completion(
    http: httpx.AsyncClient, prompt: str, rng: random.Random, max_tokens: int, outcome: Outcome
) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "n": rng.choice((1, 2)), "logprobs": 1, "temperature": 0.8}
    if rng.random() < 0.4:
        body["stop"] = rng.choice(STOP_STRINGS)
    response = await http.post(COMPLETIONS_PATH, json=body)
    outcome.status = response.status_code
    if response.status_code != 200:
        _read_error(response, outcome)
        return
    data = response.json()
    outcome.finished = all(choice["finish_reason"] in ("stop", "length") for choice in data["choices"])
    outcome.usage_tokens = data["usage"]["completion_tokens"]
    outcome.streamed_tokens = sum(len(choice["logprobs"]["tokens"]) for choice in data["choices"])


async def _greedy(http: httpx.AsyncClient, prompt: str, max_tokens: int, outcome: Outcome) -> None:
    outcome.body = greedy_body(prompt, max_tokens)
    response = await http.post(CHAT_PATH, json=outcome.body)
    outcome.status = response.status_code
    if response.status_code != 200:
        _read_error(response, outcome)
        return
    data = response.json()
    outcome.finished = data["choices"][0]["finish_reason"] in ("stop", "length")
    outcome.text = data["choices"][0]["message"]["content"]


async def _chat_stream(
    http: httpx.AsyncClient, body: dict[str, Any], outcome: Outcome, leave_after: int | None, pause_s: float
) -> None:
    tokens: dict[int, int] = {}
    finished: set[int] = set()
    events = 0
    done = False
    async with http.stream("POST", CHAT_PATH, json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            _read_error(response, outcome)
            return
        last = time.monotonic()
        async for line in response.aiter_lines():
            now = time.monotonic()
            outcome.max_gap_s = max(outcome.max_gap_s, now - last)
            last = now
            if not line:
                continue
            if done:
                outcome.problems.append(f"data after [DONE]: {line[:100]}")
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            events += 1
            if "error" in event:
                outcome.error_type = event["error"]["type"]
                continue
            for choice in event["choices"]:
                logprobs = choice.get("logprobs") or {}
                tokens[choice["index"]] = tokens.get(choice["index"], 0) + len(logprobs.get("content") or [])
                if choice.get("finish_reason") is not None:
                    finished.add(choice["index"])
            if event.get("usage"):
                outcome.usage_tokens = event["usage"]["completion_tokens"]
            if leave_after is not None and events >= leave_after:
                outcome.aborted = True
                return
            if pause_s:
                await asyncio.sleep(pause_s)
    if not done:
        outcome.problems.append("the stream ended without [DONE]")
    outcome.finished = outcome.error_type is None and len(finished) == body["n"]
    outcome.streamed_tokens = sum(tokens.values())
    if outcome.error_type is None and outcome.usage_tokens is None:
        outcome.problems.append("no usage chunk")


def _read_error(response: httpx.Response, outcome: Outcome) -> None:
    try:
        outcome.error_type = response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        outcome.problems.append(f"{response.status_code} without an OpenAI error body: {response.text[:200]}")
