"""Pydantic schemas of the OpenAI-compatible API: requests as clients send them, responses as we answer.

Fields are typed strictly here; their ranges are checked once, by SamplingParams, where they enter the engine.
Defaults follow OpenAI and vLLM: a completion without `max_tokens` gets 16 tokens, a chat completion
without one may use the rest of the context window.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.errors import InvalidArgumentError
from pagedllm.sampling_params import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16
# torch.Generator.manual_seed takes a signed or unsigned 64-bit seed; a sample adds its index to it.
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
# Beyond the vocabulary top_k is a no-op; a bound keeps it inside the sampler's int64 tensors.
TOP_K_MAX = 2**31 - 1

# Request fields passed to SamplingParams under the same name when given.
SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "best_of",
    "use_beam_search",
    "beam_width",
    "length_penalty",
    "early_stopping",
)


class APIModel(BaseModel):
    """Strict types, no NaN or infinity; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(APIModel):
    include_usage: bool = False


class SamplingRequest(APIModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = Field(None, description="the served model's name (default: the served model)")
    n: int = Field(1, description="samples per prompt")
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="default 1.0; 0 is greedy")
    top_p: float | None = None
    top_k: int | None = Field(None, le=TOP_K_MAX, description="0 or -1 disables it")
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    best_of: int | None = Field(None, description="samples drawn, of which the n most likely return (not streamed)")
    use_beam_search: bool | None = Field(None, description="beam search (not streamed)")
    beam_width: int | None = Field(None, description="beam search: beams kept per step (default: best_of, else n)")
    length_penalty: float | None = Field(None, description="beam search: scores divide by length ** this")
    early_stopping: bool | Literal["never"] | None = Field(None, description="beam search stopping rule")

    def check_supported(self) -> None:
        """Refuse clearly what is valid OpenAI but not served here."""
        if self.logit_bias:
            raise InvalidArgumentError("logit_bias is not supported", "logit_bias")
        # Both choose their answers only once every candidate is complete, so there is nothing to stream before.
        if self.stream and self.use_beam_search:
            raise InvalidArgumentError("use_beam_search cannot be streamed; set stream to false", "use_beam_search")
        if self.stream and self.best_of is not None and self.best_of != self.n:
            raise InvalidArgumentError("best_of greater than n cannot be streamed; set stream to false", "best_of")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgumentError("stream_options is only allowed when stream is true", "stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams for one prompt; raises InvalidArgumentError (with `.param`) for out-of-range values."""
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(None, description=f"default {COMPLETION_DEFAULT_MAX_TOKENS}")
    logprobs: int | None = Field(None, description="log probabilities of the drawn token and this many top ones")
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: must be null")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidArgumentError("echo is not supported", "echo")
        if self.suffix is not None:
            raise InvalidArgumentError("suffix is not supported", "suffix")


class ContentPart(APIModel):
    type: str
    text: str | None = None


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """The {role, content} dict the chat template takes ('developer' is OpenAI's newer 'system')."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            return {"role": role, "content": ""}
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidArgumentError(
                    f"content part of type {part.type!r} is not supported; only text parts are", "messages"
                )
            texts.append(part.text)
        return {"role": role, "content": "\n".join(texts)}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, description="default: the rest of the context window")
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise InvalidArgumentError("messages must not be empty", "messages")
        if self.tools:
            raise InvalidArgumentError("tools are not supported", "tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise InvalidArgumentError("only response_format {'type': 'text'} is supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgumentError("top_logprobs needs logprobs to be true", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top log probabilities per token for the engine, or None for none at all."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(APIModel):
    """Either a prompt or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(APIModel):
    model: str | None = None
    tokens: list[int]


# Responses.


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV came from the prefix cache, not recomputed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(BaseModel):
    version: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
