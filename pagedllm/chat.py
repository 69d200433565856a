"""The terminal chat: one REPL over the in-process engine or a running server."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import httpx

from pagedllm.engine.engine import LLMEngine
from pagedllm.errors import PagedLLMError
from pagedllm.sampling_params import SamplingParams

Messages = list[dict[str, Any]]
HELP = "Commands: /reset starts a new conversation, /exit quits."


class ChatBackend(Protocol):
    def stream_reply(self, messages: Messages, params: SamplingParams) -> Iterator[str]:
        """Yield the assistant's reply as text deltas."""
        ...


class EngineChat:
    """Chat with an engine in this process."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._ids = itertools.count()

    def stream_reply(self, messages: Messages, params: SamplingParams) -> Iterator[str]:
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, self.engine.tokenizer.encode_chat(messages), params)
        sent = 0
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text
                    yield text[sent:]
                    sent = len(text)
                    if output.finished:
                        return
        finally:
            self.engine.abort_request(request_id)


class RemoteChat:
    """Chat with a pagedllm (or any OpenAI-compatible) server over HTTP."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600, connect=10))
        self.model = model or self.client.get("/v1/models").raise_for_status().json()["data"][0]["id"]

    def stream_reply(self, messages: Messages, params: SamplingParams) -> Iterator[str]:
        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "repetition_penalty": params.repetition_penalty,
            "penalty_alpha": params.penalty_alpha,
        }
        if params.dola_layers is not None:
            body["dola_layers"] = params.dola_layers
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise PagedLLMError(response.json().get("error", {}).get("message", response.text))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise PagedLLMError(chunk["error"].get("message", "the server reported an error"))
                for choice in chunk.get("choices", []):
                    yield choice.get("delta", {}).get("content") or ""


def run_repl(backend: ChatBackend, params: SamplingParams, system_prompt: str | None = None) -> None:
    """Read a line, stream the reply, repeat; keeps the conversation until /reset."""
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages: Messages = list(start)
    print(HELP)
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            messages = list(start)
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = ""
        try:
            for delta in backend.stream_reply(messages, params):
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [stopped]")
        except (PagedLLMError, httpx.HTTPError) as error:
            print(f"error: {error}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply})
