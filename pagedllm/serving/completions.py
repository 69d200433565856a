"""POST /v1/completions: prompts (text or token ids) in, completions out, whole or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace

from pagedllm.engine.async_engine import RequestStream
from pagedllm.engine.output import CompletionOutput, RequestOutput
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
from pagedllm.serving.logprobs import completion_logprobs, finite, prompt_completion_logprobs
from pagedllm.serving.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    CompletionChoice,
    CompletionLogprobs,
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
    # max_tokens 0 (echo only) still runs one step: the prompt's logprobs come out of the forward pass.
    params = replace(body.sampling_params(max_tokens or 1, body.logprobs), prompt_logprobs=_prompt_logprobs(body))
    await context.check_constraint(params.structured_outputs)
    meta = ResponseMeta.new("cmpl", context.model_name)
    streams = await submit(engine, meta.id, prompts, [params] * len(prompts))
    release = releaser(engine, streams)

    if body.stream:
        return sse.EventStreamResponse(_events(body, context, meta, streams), on_close=release)
    try:
        outputs = await final_outputs(streams)
    finally:
        release()
    texts = split_prompts(body.prompt)
    choices = [
        _whole_choice(body, context, prompt_index * body.n + sample.index, texts[prompt_index], output, sample)
        for prompt_index, output in enumerate(outputs)
        for sample in output.outputs
    ]
    return CompletionResponse(**meta.fields(), choices=choices, usage=usage(outputs))


def _prompt_logprobs(body: CompletionRequest) -> int | None:
    """Prompt logprobs the engine computes: the extra field's, or echo's with logprobs (at least as many top)."""
    if body.echo and body.logprobs is not None:
        return max(body.logprobs, body.prompt_logprobs or 0)
    return body.prompt_logprobs


def _whole_choice(
    body: CompletionRequest,
    context: ServingContext,
    index: int,
    prompt: str | list[int],
    output: RequestOutput,
    sample: CompletionOutput,
) -> CompletionChoice:
    """A finished choice; with echo the prompt (and its logprobs) comes first, and max_tokens 0 keeps only it."""
    generated = body.max_tokens != 0
    text = sample.text if generated else ""
    token_ids = sample.token_ids if generated else []
    logprobs = (sample.logprobs or []) if generated else []
    choice = _choice(body, context, index, text, token_ids, logprobs, 0, sample.finish_reason)
    if output.prompt_logprobs is not None and body.prompt_logprobs is not None:
        choice.prompt_logprobs = [
            None if entry is None else {str(token): finite(value) for token, value in entry.items()}
            for entry in output.prompt_logprobs
        ]
    if not body.echo:
        return choice
    prompt_text = prompt if isinstance(prompt, str) else context.engine.tokenizer.decode(prompt)
    choice.text = prompt_text + choice.text
    if body.logprobs is not None and output.prompt_logprobs is not None:
        echoed = prompt_completion_logprobs(context.token_strings, output.prompt_token_ids, output.prompt_logprobs)
        generated_part = completion_logprobs(context.token_strings, token_ids, logprobs, len(prompt_text))
        choice.logprobs = CompletionLogprobs(
            tokens=echoed.tokens + generated_part.tokens,
            token_logprobs=echoed.token_logprobs + generated_part.token_logprobs,
            top_logprobs=echoed.top_logprobs + generated_part.top_logprobs,
            text_offset=echoed.text_offset + generated_part.text_offset,
        )
    return choice


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
