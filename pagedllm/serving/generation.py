"""What both generation endpoints share: submitting prompts to the engine, merging their outputs, and
turning cumulative outputs into the deltas and usage a response reports."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pagedllm import __version__
from pagedllm.engine.async_engine import AsyncLLMEngine, RequestStream
from pagedllm.engine.output import CompletionOutput, RequestOutput
from pagedllm.errors import InvalidArgumentError, PagedLLMError, RequestTooLongError
from pagedllm.sampling_params import SamplingParams
from pagedllm.serving.logprobs import TokenStrings
from pagedllm.serving.protocol import PromptTokensDetails, Usage
from pagedllm.serving.tool_parsers import ToolParser
from pagedllm.structured_output.backend import GrammarBackend
from pagedllm.structured_output.params import StructuredOutputsParams

SYSTEM_FINGERPRINT = f"fp_pagedllm_{__version__}"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, checked before its text is tokenized."""

    max_request_sequences: int = 64
    max_chat_messages: int = 2048


@dataclass
class ServingContext:
    """What a handler needs besides its request: the engine, the names it answers with, and the limits."""

    engine: AsyncLLMEngine
    model_name: str
    token_strings: TokenStrings
    grammars: GrammarBackend
    tool_parser: ToolParser
    limits: RequestLimits = field(default_factory=RequestLimits)
    started: int = field(default_factory=lambda: int(time.time()))

    async def check_constraint(self, constraint: StructuredOutputsParams | None) -> None:
        """Compile a request's constraint off the engine thread (cached, so the engine finds it compiled)."""
        if constraint is not None:
            await asyncio.to_thread(self.grammars.compile, constraint)

    def check_sequences(self, num_prompts: int, samples_per_prompt: int) -> None:
        """Refuse a request for more sequences than its share (400), or than the queue has room for now (503)."""
        total = num_prompts * samples_per_prompt
        if total > self.limits.max_request_sequences:
            raise InvalidArgumentError(
                f"the request asks for {total} sequences ({num_prompts} prompts x {samples_per_prompt} samples); "
                f"one request may ask for at most {self.limits.max_request_sequences} (max_request_sequences)",
                "prompt" if num_prompts > 1 else "n",
            )
        self.engine.check_room(total)

    def check_messages(self, num_messages: int) -> None:
        if num_messages > self.limits.max_chat_messages:
            raise InvalidArgumentError(
                f"the conversation has {num_messages} messages; at most {self.limits.max_chat_messages} are allowed "
                "(max_chat_messages)",
                "messages",
            )

    @property
    def max_prompt_chars(self) -> int:
        """Longer texts cannot fit a request's tokens, each token standing for at most max_token_chars characters."""
        return self.engine.tokenizer.max_token_chars * self.engine.max_request_tokens

    def check_text(self, text: str, param: str) -> None:
        """Refuse, before tokenizing it, a text too long to fit the context whatever its tokens."""
        if len(text) > self.max_prompt_chars:
            raise RequestTooLongError(
                f"the {param} has {len(text)} characters, more than {self.engine.max_request_tokens} tokens (the "
                f"most one request may have) can hold",
                param,
            )


@dataclass(frozen=True)
class ResponseMeta:
    """The fields every response and chunk of one request repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def fields(self) -> dict[str, Any]:
        return asdict(self)


def default_max_tokens(engine: AsyncLLMEngine, prompt_len: int, param: str) -> int:
    """The rest of the context window after the prompt (as vLLM does when max_tokens is left out)."""
    room = engine.max_request_tokens - prompt_len
    if room < 1:
        raise RequestTooLongError(
            f"the prompt has {prompt_len} tokens, which leaves no room to generate: a request may have at most "
            f"{engine.max_request_tokens} tokens (context {engine.max_model_len})",
            param,
        )
    return room


async def submit(
    engine: AsyncLLMEngine, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
) -> list[RequestStream]:
    """Add one engine request per prompt, all or none: if any is refused, the others are aborted."""
    results = await asyncio.gather(
        *(
            engine.add_request(f"{request_id}-{index}", prompt, p)
            for index, (prompt, p) in enumerate(zip(prompts, params))
        ),
        return_exceptions=True,
    )
    streams = [result for result in results if isinstance(result, RequestStream)]
    errors = [result for result in results if isinstance(result, BaseException)]
    if errors:
        for stream in streams:
            engine.release(stream)
        raise errors[0]
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come, until all have finished."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    channel: asyncio.Queue[tuple[int, RequestOutput | PagedLLMError]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await channel.put((index, output))
        except PagedLLMError as error:
            await channel.put((index, error))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await channel.get()
            if isinstance(item, PagedLLMError):
                raise item
            remaining -= item.finished
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


def releaser(engine: AsyncLLMEngine, streams: list[RequestStream]) -> Callable[[], None]:
    """A callback that aborts whichever of `streams` have not finished (the client left, or the response is done)."""

    def release() -> None:
        for stream in streams:
            engine.release(stream)

    return release


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """The finished output of each stream, in prompt order."""
    finals: dict[int, RequestOutput] = {}
    async for index, output in merged(streams):
        finals[index] = output
    return [finals[index] for index in range(len(streams))]


def usage(outputs: Iterable[RequestOutput]) -> Usage:
    outputs = list(outputs)
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    completion_tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    cached_tokens = sum(output.num_cached_tokens for output in outputs)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


@dataclass(frozen=True)
class Delta:
    """What one sample gained since it was last reported."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    text_offset: int  # characters of this sample's text reported before


class DeltaTracker:
    """Remembers how much of each choice has been sent, so a cumulative output yields only what is new."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int, bool]] = {}

    def delta(self, choice_index: int, sample: CompletionOutput) -> Delta | None:
        """The news in `sample`, or None when it has none (a finished choice never has)."""
        text_len, num_tokens, finished = self._sent.get(choice_index, (0, 0, False))
        if finished:
            return None
        new_text = sample.text[text_len:]
        new_ids = sample.token_ids[num_tokens:]
        if not new_text and not new_ids and not sample.finished:
            return None
        self._sent[choice_index] = (max(text_len, len(sample.text)), len(sample.token_ids), sample.finished)
        logprobs = sample.logprobs[num_tokens:] if sample.logprobs is not None else None
        return Delta(new_text, new_ids, logprobs, sample.finish_reason, text_len)
