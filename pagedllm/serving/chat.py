"""POST /v1/chat/completions: a conversation in, the assistant's reply out, whole or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from pagedllm.engine.async_engine import RequestStream
from pagedllm.engine.output import RequestOutput
from pagedllm.errors import PagedLLMError
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
)


async def create_chat_completion(
    body: ChatCompletionRequest, context: ServingContext
) -> ChatCompletionResponse | sse.EventStreamResponse:
    body.check_supported()
    context.check_messages(len(body.messages))
    context.check_sequences(1, body.best_of or body.n)
    engine = context.engine
    messages = [message.as_template_message() for message in body.messages]
    prompt = await asyncio.to_thread(engine.tokenizer.encode_chat, messages, True, context.max_prompt_chars)
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(engine, len(prompt), "messages")
    params = body.sampling_params(max_tokens, body.num_logprobs)
    meta = ResponseMeta.new("chatcmpl", context.model_name)
    streams = await submit(engine, meta.id, [prompt], [params])
    release = releaser(engine, streams)

    if body.stream:
        return sse.EventStreamResponse(_events(body, context, meta, streams), on_close=release)
    try:
        (output,) = await final_outputs(streams)
    finally:
        release()
    choices = [
        ChatChoice(
            index=sample.index,
            message=AssistantMessage(content=sample.text),
            logprobs=_logprobs(body, context, sample.token_ids, sample.logprobs),
            finish_reason=sample.finish_reason,
        )
        for sample in output.outputs
    ]
    return ChatCompletionResponse(**meta.fields(), choices=choices, usage=usage([output]))


def _logprobs(
    body: ChatCompletionRequest, context: ServingContext, token_ids: list[int], logprobs: list[dict[int, float]] | None
) -> ChatLogprobs | None:
    if not body.logprobs or logprobs is None:
        return None
    return chat_logprobs(context.token_strings, token_ids, logprobs, body.top_logprobs or 0)


async def _events(
    body: ChatCompletionRequest, context: ServingContext, meta: ResponseMeta, streams: list[RequestStream]
) -> AsyncGenerator[str, None]:
    tracker = DeltaTracker()
    latest: RequestOutput | None = None
    try:
        roles = [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")) for index in range(body.n)]
        yield sse.event(ChatCompletionChunk(**meta.fields(), choices=roles))
        async for _, output in merged(streams):
            latest = output
            choices = []
            for sample in output.outputs:
                delta = tracker.delta(sample.index, sample)
                if delta is not None:
                    choices.append(
                        ChatChunkChoice(
                            index=sample.index,
                            delta=ChatDelta(content=delta.text),
                            logprobs=_logprobs(body, context, delta.token_ids, delta.logprobs),
                            finish_reason=delta.finish_reason,
                        )
                    )
            if choices:
                yield sse.event(ChatCompletionChunk(**meta.fields(), choices=choices))
        if body.include_usage and latest is not None:
            yield sse.event(ChatCompletionChunk(**meta.fields(), choices=[], usage=usage([latest])))
    except PagedLLMError as error:
        yield sse.event(exception_body(error))
    yield sse.DONE
