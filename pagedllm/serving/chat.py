"""POST /v1/chat/completions: a conversation in, the assistant's reply (text or tool calls) out, whole or
streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from pagedllm.engine.async_engine import RequestStream
from pagedllm.engine.output import CompletionOutput, RequestOutput
from pagedllm.errors import InvalidArgumentError, PagedLLMError
from pagedllm.serving import sse
from pagedllm.serving.error_responses import exception_body
from pagedllm.serving.generation import (
    DeltaTracker,
    ResponseMeta,
    ServingContext,
    default_max_tokens,
    final_outputs,
    merged,
    releaser,
    submit,
    usage,
)
from pagedllm.serving.logprobs import chat_logprobs
from pagedllm.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    FunctionCall,
    ToolCall,
)
from pagedllm.serving.tool_call_stream import ToolCallStream
from pagedllm.serving.tool_parsers import ParsedOutput
from pagedllm.serving.tools import (
    ToolSetup,
    call_id,
    check_parameter_schemas,
    parse_reply,
    template_messages,
    tool_call_constraint,
    tool_setup,
)
from pagedllm.structured_output.params import StructuredOutputsParams


@dataclass(frozen=True)
class ChatPlan:
    """What a request asks beyond plain text: its tools and the constraint on its output."""

    tools: ToolSetup | None
    constraint: StructuredOutputsParams | None


def plan(body: ChatCompletionRequest) -> ChatPlan:
    """Check tools, tool_choice, response_format and structured_outputs together; at most one constrains."""
    tools = tool_setup(body.tools, body.tool_choice, body.parallel_tool_calls)
    constraints = [
        constraint
        for constraint in (
            tool_call_constraint(tools) if tools is not None and tools.constrained else None,
            body.response_format_params(),
            body.structured_outputs_params(),
        )
        if constraint is not None
    ]
    if len(constraints) > 1:
        raise InvalidArgumentError(
            "give only one of tool_choice required or named, response_format json, and structured_outputs",
            "response_format",
        )
    return ChatPlan(tools, constraints[0] if constraints else None)


@dataclass(frozen=True)
class ChatRun:
    """A chat request submitted to the engine: what collecting or streaming its reply needs."""

    body: ChatCompletionRequest
    context: ServingContext
    plan: ChatPlan
    meta: ResponseMeta
    streams: list[RequestStream]
    release: Callable[[], None]  # aborts what has not finished; call it however the reply ends


async def start_chat(body: ChatCompletionRequest, context: ServingContext) -> ChatRun:
    """Check the request, render and tokenize the conversation, and submit it."""
    body.check_supported()
    context.check_messages(len(body.messages))
    context.check_sequences(1, body.best_of or body.n)
    chat = plan(body)
    engine = context.engine
    if chat.tools is not None:
        await asyncio.to_thread(check_parameter_schemas, chat.tools, context.grammars)
    await context.check_constraint(chat.constraint)
    messages, tools = template_messages(
        [message.as_template_message() for message in body.messages], chat.tools, engine.tokenizer.template_takes_tools
    )
    prompt = await asyncio.to_thread(engine.tokenizer.encode_chat, messages, True, tools, context.max_prompt_chars)
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(engine, len(prompt), "messages")
    params = body.sampling_params(max_tokens, body.num_logprobs, chat.constraint)
    meta = ResponseMeta.new("chatcmpl", context.model_name)
    streams = await submit(engine, meta.id, [prompt], [params])
    return ChatRun(body, context, chat, meta, streams, releaser(engine, streams))


async def create_chat_completion(
    body: ChatCompletionRequest, context: ServingContext
) -> ChatCompletionResponse | sse.EventStreamResponse:
    run = await start_chat(body, context)
    if body.stream:
        return sse.EventStreamResponse(_events(run), on_close=run.release)
    try:
        (output,) = await final_outputs(run.streams)
    finally:
        run.release()
    choices = [_choice(body, context, run.plan, sample) for sample in output.outputs]
    return ChatCompletionResponse(**run.meta.fields(), choices=choices, usage=usage([output]))


def _choice(
    body: ChatCompletionRequest, context: ServingContext, chat: ChatPlan, sample: CompletionOutput
) -> ChatChoice:
    parsed = parse_reply(sample.text, chat.tools, context.tool_parser)
    calls = [ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls]
    return ChatChoice(
        index=sample.index,
        message=AssistantMessage(content=parsed.content if calls else sample.text, tool_calls=calls or None),
        logprobs=_logprobs(body, context, sample.token_ids, sample.logprobs),
        finish_reason=_finish_reason(sample.finish_reason, parsed),
    )


def _finish_reason(reason: str | None, parsed: ParsedOutput) -> str | None:
    return "tool_calls" if reason is not None and parsed.calls else reason


def _logprobs(
    body: ChatCompletionRequest, context: ServingContext, token_ids: list[int], logprobs: list[dict[int, float]] | None
) -> ChatLogprobs | None:
    if not body.logprobs or logprobs is None:
        return None
    return chat_logprobs(context.token_strings, token_ids, logprobs, body.top_logprobs or 0)


async def chat_chunks(run: ChatRun) -> AsyncGenerator[ChatCompletionChunk, None]:
    """The chunks of a streamed reply: the role, then each step's news per choice, then the usage when asked; a
    PagedLLMError from the engine ends them."""
    body, context, meta = run.body, run.context, run.meta
    tracker = DeltaTracker()
    tools = run.plan.tools if run.plan.tools is not None and run.plan.tools.choice != "none" else None
    tool_streams = {index: ToolCallStream(tools, context.tool_parser) for index in range(body.n)} if tools else {}
    latest: RequestOutput | None = None
    roles = [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")) for index in range(body.n)]
    yield ChatCompletionChunk(**meta.fields(), choices=roles)
    async for _, output in merged(run.streams):
        latest = output
        choices = []
        for sample in output.outputs:
            delta = tracker.delta(sample.index, sample)
            if delta is None:
                continue
            logprobs = _logprobs(body, context, delta.token_ids, delta.logprobs)
            if sample.index not in tool_streams:
                content = ChatDelta(content=delta.text)
                choices.append(
                    ChatChunkChoice(
                        index=sample.index, delta=content, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                )
                continue
            stream = tool_streams[sample.index]
            if delta.finish_reason is None:
                choices.append(ChatChunkChoice(index=sample.index, delta=stream.delta(sample.text), logprobs=logprobs))
                continue
            final = stream.finish(sample.text)
            reason = stream.finish_reason(delta.finish_reason)
            choices.append(ChatChunkChoice(index=sample.index, delta=final, logprobs=logprobs, finish_reason=reason))
        if choices:
            yield ChatCompletionChunk(**meta.fields(), choices=choices)
    if body.include_usage and latest is not None:
        yield ChatCompletionChunk(**meta.fields(), choices=[], usage=usage([latest]))


async def _events(run: ChatRun) -> AsyncGenerator[str, None]:
    try:
        async for chunk in chat_chunks(run):
            yield sse.event(chunk)
    except PagedLLMError as error:
        yield sse.event(exception_body(error))
    yield sse.DONE
