"""POST /v1/completions: prompts (text or token ids) in, completions out, whole or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from pagedllm.engine.async_engine import RequestStream
from pagedllm.engine.output import RequestOutput
from pagedllm.errors import InvalidArgumentError, PagedLLMError
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.serving import sse
from pagedllm.serving.error_responses import exception_body
from pagedllm.serving.generation import (
    DeltaTracker,
    ResponseMeta,
    ServingContext,
    final_outputs,
    merged,
    releaser,
    submit,
    usage,
)
from pagedllm.serving.logprobs import completion_logprobs
from pagedllm.serving.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Prompt,
)


def split_prompts(prompt: Prompt) -> list[str | list[int]]:
    """The request's prompts: one string or token-id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidArgumentError("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def tokenize_prompts(tokenizer: Tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    return [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]


async def create_completion(
    body: CompletionRequest, context: ServingContext
) -> CompletionResponse | sse.EventStreamResponse:
    body.check_supported()
    engine = context.engine
    texts = split_prompts(body.prompt)
    context.check_sequences(len(texts), body.best_of or body.n)
    for text in texts:
        if isinstance(text, str):
            context.check_text(text, "prompt")
    prompts = await asyncio.to_thread(tokenize_prompts, engine.tokenizer, texts)
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    params = body.sampling_params(max_tokens, body.logprobs)
    meta = ResponseMeta.new("cmpl", context.model_name)
    streams = await submit(engine, meta.id, prompts, [params] * len(prompts))
    release = releaser(engine, streams)

    if body.stream:
        return sse.EventStreamResponse(_events(body, context, meta, streams), on_close=release)
    try:
        outputs = await final_outputs(streams)
    finally:
        release()
    choices = [
        _choice(
            body,
            context,
            prompt_index * body.n + sample.index,
            sample.text,
            sample.token_ids,
            sample.logprobs,
            0,
            sample.finish_reason,
        )
        for prompt_index, output in enumerate(outputs)
        for sample in output.outputs
    ]
    return CompletionResponse(**meta.fields(), choices=choices, usage=usage(outputs))


def _choice(
    body: CompletionRequest,
    context: ServingContext,
    index: int,
    text: str,
    token_ids: list[int],
    logprobs: list[dict[int, float]] | None,
    text_offset: int,
    finish_reason: str | None,
) -> CompletionChoice:
    formatted = None
    if body.logprobs is not None and logprobs is not None:
        formatted = completion_logprobs(context.token_strings, token_ids, logprobs, text_offset)
    return CompletionChoice(index=index, text=text, logprobs=formatted, finish_reason=finish_reason)


async def _events(
    body: CompletionRequest, context: ServingContext, meta: ResponseMeta, streams: list[RequestStream]
) -> AsyncGenerator[str, None]:
    tracker = DeltaTracker()
    latest: dict[int, RequestOutput] = {}
    try:
        async for prompt_index, output in merged(streams):
            latest[prompt_index] = output
            choices = []
            for sample in output.outputs:
                index = prompt_index * body.n + sample.index
                delta = tracker.delta(index, sample)
                if delta is not None:
                    choices.append(
                        _choice(
                            body,
                            context,
                            index,
                            delta.text,
                            delta.token_ids,
                            delta.logprobs,
                            delta.text_offset,
                            delta.finish_reason,
                        )
                    )
            if choices:
                yield sse.event(CompletionResponse(**meta.fields(), choices=choices))
        if body.include_usage:
            yield sse.event(CompletionResponse(**meta.fields(), choices=[], usage=usage(latest.values())))
    except PagedLLMError as error:
        yield sse.event(exception_body(error))
    yield sse.DONE
