"""Pydantic schemas of the OpenAI-compatible API: requests as clients send them, responses as we answer.

Fields are typed strictly here; their ranges are checked once, by SamplingParams, where they enter the engine.
Defaults follow OpenAI and vLLM: a completion without `max_tokens` gets 16 tokens, a chat completion
without one may use the rest of the context window.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from pagedllm.errors import InvalidArgumentError
from pagedllm.sampling_params import MAX_SEED, SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams

COMPLETION_DEFAULT_MAX_TOKENS = 16
INVALID_TEXT = "invalid_text"  # the validation error type of a string that is not valid Unicode
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
    "penalty_alpha",
    "dola_layers",
)


def _surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string in a JSON value holding a lone UTF-16 surrogate, or None."""
    if isinstance(value, str):
        return None if value.isascii() or _is_valid_unicode(value) else path
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and not _is_valid_unicode(key):
            return path  # the key itself cannot be named in a message
        found = _surrogate_path(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class APIModel(BaseModel):
    """Strict types, no NaN or infinity, text that is valid Unicode; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may escape lone surrogates (\udc80); Python decodes them, but no tokenizer or encoder takes them.
        path = _surrogate_path(data, "")
        if path is not None:
            raise PydanticCustomError(
                INVALID_TEXT,
                "{path}: the text holds a lone UTF-16 surrogate, which is not valid Unicode",
                {"path": path or "the body"},
            )
        return data


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
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's constraint: exactly one of json (a schema), json_object, regex, choice, grammar"
    )
    best_of: int | None = Field(None, description="samples drawn, of which the n most likely return (not streamed)")
    use_beam_search: bool | None = Field(None, description="beam search (not streamed)")
    beam_width: int | None = Field(None, description="beam search: beams kept per step (default: best_of, else n)")
    length_penalty: float | None = Field(None, description="beam search: scores divide by length ** this")
    early_stopping: bool | Literal["never"] | None = Field(None, description="beam search stopping rule")
    penalty_alpha: float | None = Field(None, description="contrastive search's degeneration penalty (with top_k > 1)")
    dola_layers: str | list[int] | None = Field(None, description="DoLa: 'low', 'high' or premature layer indices")

    def check_supported(self) -> None:
        """Refuse clearly what is valid OpenAI but not served here."""
        # Both choose their answers only once every candidate is complete, so there is nothing to stream before.
        if self.stream and self.use_beam_search:
            raise InvalidArgumentError("use_beam_search cannot be streamed; set stream to false", "use_beam_search")
        if self.stream and self.best_of is not None and self.best_of != self.n:
            raise InvalidArgumentError("best_of greater than n cannot be streamed; set stream to false", "best_of")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgumentError("stream_options is only allowed when stream is true", "stream_options")

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, structured_outputs: StructuredOutputsParams | None = None
    ) -> SamplingParams:
        """SamplingParams for one prompt; raises InvalidArgumentError (with `.param`) for out-of-range values."""
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=max_tokens,
            logprobs=logprobs,
            logit_bias=self.token_logit_bias(),
            structured_outputs=structured_outputs or self.structured_outputs_params(),
            **given,
        )

    def token_logit_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys as token ids."""
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError as error:
            raise InvalidArgumentError("logit_bias keys must be token ids", "logit_bias") from error

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        return StructuredOutputsParams.from_dict(self.structured_outputs) if self.structured_outputs else None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: int | None = Field(None, description=f"default {COMPLETION_DEFAULT_MAX_TOKENS}")
    logprobs: int | None = Field(None, description="log probabilities of the drawn token and this many top ones")
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: its tokens')")
    prompt_logprobs: int | None = Field(None, description="vLLM's: logprobs of each prompt token and this many top")
    suffix: str | None = Field(None, description="not supported: must be null")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo and self.stream:
            raise InvalidArgumentError("echo cannot be streamed; set stream to false", "echo")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidArgumentError("max_tokens must be >= 1 (0 only with echo)", "max_tokens")
        if self.suffix is not None:
            raise InvalidArgumentError("suffix is not supported", "suffix")


class ContentPart(APIModel):
    type: str
    text: str | None = None


class FunctionCall(APIModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCall(APIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    def as_template_message(self) -> dict[str, Any]:
        """The {role, content} dict the chat template takes ('developer' is OpenAI's newer 'system'), with an
        assistant's tool calls (arguments parsed, as templates expect them) and a tool result's call id."""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            message["name"] = self.name
        return message

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidArgumentError(
                    f"content part of type {part.type!r} is not supported; only text parts are", "messages"
                )
            texts.append(part.text)
        return "\n".join(texts)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, description="default: the rest of the context window")
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="functions the model may call")
    tool_choice: str | dict[str, Any] | None = Field(None, description="auto, none, required or a named function")
    parallel_tool_calls: bool = Field(True, description="whether one reply may call several tools")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema")

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise InvalidArgumentError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgumentError("top_logprobs needs logprobs to be true", "top_logprobs")

    def response_format_params(self) -> StructuredOutputsParams | None:
        """The constraint response_format asks for: any JSON object, or a JSON schema's instances."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            spec = self.response_format.get("json_schema") if self.response_format else None
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise InvalidArgumentError(
                    "response_format json_schema needs a json_schema.schema object", "response_format"
                )
            return StructuredOutputsParams(json=spec["schema"])
        raise InvalidArgumentError(
            f"response_format type {kind!r} is not supported; use text, json_object or json_schema", "response_format"
        )

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
    token_logprobs: list[float | None] = Field(default_factory=list)  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, float] | None] | None = None  # token id -> logprob per prompt token


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None


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
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, description="null when the reply calls no tool, as OpenAI's")


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


class OmitsNull(BaseModel):
    """Serialized without its null fields: a client accumulating a stream merges every field it is sent, and a
    null `type` or `name` would overwrite what an earlier delta gave."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(OmitsNull):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OmitsNull):
    """A piece of one streamed call: the first carries its id, type and name, later ones more of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
