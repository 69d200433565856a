"""POST /v1/responses: OpenAI's Responses API over the chat machinery (the input items become chat messages,
`text.format` a response_format, function tools chat tools), answered whole or as an event stream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError

from pagedllm.errors import InvalidArgumentError
from pagedllm.serving import sse
from pagedllm.serving.chat import create_chat_completion
from pagedllm.serving.generation import ServingContext
from pagedllm.serving.protocol import APIModel, ChatCompletionRequest, ChatCompletionResponse


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
        """The same request as a chat completion (never streamed: events are made from the whole answer)."""
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


def response_object(body: ResponsesRequest, chat: ChatCompletionResponse) -> dict[str, Any]:
    """The Response the SDK parses: a message item with the text, or function_call items."""
    message = chat.choices[0].message
    output: list[dict[str, Any]] = [
        {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex}",
            "call_id": call.id,
            "name": call.function.name,
            "arguments": call.function.arguments,
            "status": "completed",
        }
        for call in message.tool_calls or []
    ]
    if message.content or not output:
        text = {"type": "output_text", "text": message.content or "", "annotations": []}
        output.insert(
            0,
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "status": "completed",
                "role": "assistant",
                "content": [text],
            },
        )
    incomplete = chat.choices[0].finish_reason == "length"
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "model": chat.model,
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
        "usage": {
            "input_tokens": chat.usage.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": chat.usage.prompt_tokens_details.cached_tokens
                if chat.usage.prompt_tokens_details
                else 0
            },
            "output_tokens": chat.usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat.usage.total_tokens,
        },
    }


async def create_response(body: ResponsesRequest, context: ServingContext) -> dict[str, Any] | sse.EventStreamResponse:
    chat = await create_chat_completion(body.chat_request(), context)
    assert isinstance(chat, ChatCompletionResponse)
    response = response_object(body, chat)
    if not body.stream:
        return response
    return sse.EventStreamResponse(_events(response), on_close=lambda: None)


async def _events(response: dict[str, Any]) -> AsyncGenerator[str, None]:
    """The event sequence of a finished response: created, each output item with its text, completed."""
    number = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        number += 1
        return f"event: {kind}\n" + sse.event({"type": kind, "sequence_number": number, **fields})

    yield event("response.created", response={**response, "status": "in_progress", "output": []})
    for index, item in enumerate(response["output"]):
        yield event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            )
            yield event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
            yield event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            yield event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=item["content"][0],
            )
        else:
            yield event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=item["arguments"],
            )
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            )
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=response)
