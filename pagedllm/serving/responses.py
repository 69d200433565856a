"""POST /v1/responses: OpenAI's Responses API over the chat machinery (the input items become chat messages,
`text.format` a response_format, function tools chat tools), answered whole or as an event stream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError

from pagedllm.errors import InvalidArgumentError, PagedLLMError
from pagedllm.serving import sse
from pagedllm.serving.chat import ChatRun, chat_chunks, create_chat_completion, start_chat
from pagedllm.serving.generation import ServingContext
from pagedllm.serving.protocol import APIModel, ChatCompletionRequest, ChatCompletionResponse, DeltaToolCall, Usage


class ResponsesRequest(APIModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = Field(None, description="{'format': text | json_object | json_schema}")
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion; streamed, it reports its usage for the completed response."""
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + _messages(
            self.input
        )
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "tools": [_chat_tool(tool) for tool in self.tools] if self.tools else None,
            "tool_choice": _chat_tool_choice(self.tool_choice),
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": _response_format((self.text or {}).get("format")),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stream": self.stream,
            "stream_options": {"include_usage": True} if self.stream else None,
        }
        try:
            return ChatCompletionRequest.model_validate(
                {k: v for k, v in fields.items() if v is not None}, strict=False
            )
        except ValidationError as error:  # a value the chat schema refuses (a seed out of range...): a 400 as there
            raise RequestValidationError(error.errors()) from error


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
            messages.append({"role": item.get("role", "user"), "content": content or ""})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": output if isinstance(output, str) else json.dumps(output),
                }
            )
        else:
            raise InvalidArgumentError(f"input items of type {kind!r} are not supported", "input")
    return messages


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidArgumentError(f"tools of type {tool.get('type')!r} are not supported; only function", "tools")
    function = {key: tool[key] for key in ("name", "description", "parameters") if key in tool}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if not text_format or text_format.get("type") == "text":
        return None
    if text_format.get("type") == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": text_format.get("name", "output"), "schema": text_format.get("schema")},
        }
    return {"type": text_format.get("type")}


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = {"type": "output_text", "text": text, "annotations": []}
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [content],
    }


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_object(body: ResponsesRequest, chat: ChatCompletionResponse) -> dict[str, Any]:
    """The Response the SDK parses: a message item with the text, or function_call items."""
    message = chat.choices[0].message
    output = [
        function_call_item(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or []
    ]
    if message.content or not output:
        output.insert(0, message_item(message.content or ""))
    return response_fields(body, chat.model, output, chat.choices[0].finish_reason, chat.usage)


def response_fields(
    body: ResponsesRequest, model: str, output: list[dict[str, Any]], finish_reason: str | None, usage: Usage | None
) -> dict[str, Any]:
    """A Response with these output items, completed (incomplete when cut short by max_output_tokens)."""
    incomplete = finish_reason == "length"
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "instructions": body.instructions,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "text": body.text or {"format": {"type": "text"}},
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "metadata": {},
        "usage": None if usage is None else response_usage(usage),
    }


def response_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


async def create_response(body: ResponsesRequest, context: ServingContext) -> dict[str, Any] | sse.EventStreamResponse:
    if not body.stream:
        chat = await create_chat_completion(body.chat_request(), context)
        assert isinstance(chat, ChatCompletionResponse)
        return response_object(body, chat)
    run = await start_chat(body.chat_request(), context)
    return sse.EventStreamResponse(_events(body, run), on_close=run.release)


class ResponseEvents:
    """The Responses API's events for a reply streamed as chat chunks: each output item (a message, a function
    call) is added when its first piece comes, grows by deltas, and is done when the next begins or the reply
    ends."""

    def __init__(self) -> None:
        self.number = 0  # the last event's sequence number
        self.items: list[dict[str, Any]] = []  # the response's output as far as it has been streamed
        self.open: int | None = None  # the output index of the item being written
        self.calls: dict[int, int] = {}  # a tool call's index → its item's output index

    def event(self, kind: str, **fields: Any) -> str:
        self.number += 1
        return f"event: {kind}\n" + sse.event({"type": kind, "sequence_number": self.number, **fields})

    def text(self, delta: str) -> Iterator[str]:
        if self.open is None or self.items[self.open]["type"] != "message":
            yield from self.close()
            yield from self._add(message_item("", status="in_progress"))
            part = {"type": "output_text", "text": "", "annotations": []}
            yield self._item_event("response.content_part.added", content_index=0, part=part)
        self.items[self.open]["content"][0]["text"] += delta
        yield self._item_event("response.output_text.delta", content_index=0, delta=delta, logprobs=[])

    def call(self, piece: DeltaToolCall) -> Iterator[str]:
        if piece.id is not None:
            yield from self.close()
            yield from self._add(function_call_item(piece.id, piece.function.name or "", "", status="in_progress"))
            self.calls[piece.index] = len(self.items) - 1
        if piece.function.arguments:
            index = self.calls[piece.index]
            self.items[index]["arguments"] += piece.function.arguments
            yield self._item_event("response.function_call_arguments.delta", index, delta=piece.function.arguments)

    def close(self) -> Iterator[str]:
        """Finish the item being written, if any."""
        if self.open is None:
            return
        item = self.items[self.open]
        item["status"] = "completed"
        if item["type"] == "message":
            text = item["content"][0]["text"]
            yield self._item_event("response.output_text.done", content_index=0, text=text, logprobs=[])
            yield self._item_event("response.content_part.done", content_index=0, part=item["content"][0])
        else:
            yield self._item_event("response.function_call_arguments.done", arguments=item["arguments"])
        yield self.event("response.output_item.done", output_index=self.open, item=item)
        self.open = None

    def _add(self, item: dict[str, Any]) -> Iterator[str]:
        self.items.append(item)
        self.open = len(self.items) - 1
        yield self.event("response.output_item.added", output_index=self.open, item=item)

    def _item_event(self, kind: str, index: int | None = None, **fields: Any) -> str:
        index = self.open if index is None else index
        assert index is not None
        return self.event(kind, item_id=self.items[index]["id"], output_index=index, **fields)


async def _events(body: ResponsesRequest, run: ChatRun) -> AsyncGenerator[str, None]:
    """created, then each output item as the reply is written, then completed (or an error event)."""
    events = ResponseEvents()
    created = response_fields(body, run.meta.model, [], None, None)
    yield events.event("response.created", response={**created, "status": "in_progress"})
    finish_reason, usage = None, None
    try:
        async for chunk in chat_chunks(run):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.content:
                    for event in events.text(choice.delta.content):
                        yield event
                for piece in choice.delta.tool_calls or []:
                    for event in events.call(piece):
                        yield event
                finish_reason = choice.finish_reason or finish_reason
    except PagedLLMError as error:
        # The Responses API's error event names the error by `code` (its `type` is the event's).
        yield events.event("error", code=error.error_type, message=error.message, param=error.param)
        return
    if not events.items:
        for event in events.text(""):
            yield event
    for event in events.close():
        yield event
    completed = response_fields(body, run.meta.model, events.items, finish_reason, usage)
    # The same response as `created` announced: its id and creation time.
    completed.update(id=created["id"], created_at=created["created_at"])
    yield events.event("response.completed", response=completed)
