"""What the engine reports per request each step, and how a new token updates a sequence's text and state."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.engine.request import FinishReason, Request, Sequence


@dataclass
class CompletionOutput:
    """One sample's output so far (cumulative)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per generated token: the drawn token's and the top ones' logprobs
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float
    first_token_time: float | None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


def make_request_output(request: Request) -> RequestOutput:
    wants_logprobs = request.params.logprobs is not None
    outputs = [
        CompletionOutput(
            index=seq.index,
            text=seq.text[: seq.emitted_text_len],
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
            logprobs=list(seq.logprobs) if wants_logprobs else None,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
        )
        for seq in sorted(request.sequences, key=lambda s: s.index)
    ]
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        prompt_logprobs=list(request.prompt_logprobs) if request.params.prompt_logprobs is not None else None,
        outputs=outputs,
        finished=request.finished,
        arrival_time=request.arrival_time,
        first_token_time=request.first_token_time,
        num_cached_tokens=request.num_cached_tokens,
    )


def append_token(seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_model_len: int) -> None:
    """Add a drawn token: extend the text, then decide whether the sequence stops and why."""
    params = seq.request.params
    seq.output_token_ids.append(token_id)
    checked_len = len(seq.text)
    seq.text += seq.detokenizer.push([token_id])
    num_output = len(seq.output_token_ids)
    if num_output >= params.min_tokens:
        if token_id in params.stop_token_ids:
            _finish(seq, FinishReason.STOP, token_id)
        elif not params.ignore_eos and token_id in eos_token_ids:
            _finish(seq, FinishReason.STOP, None)
        elif params.stop:
            _finish_at_stop_string(seq, checked_len)
    if seq.finish_reason is None and (num_output >= params.max_tokens or seq.num_tokens >= max_model_len):
        _finish(seq, FinishReason.LENGTH, None)
    seq.emitted_text_len = len(seq.text) if seq.finish_reason else len(seq.text) - _held_back(seq.text, params.stop)


def _finish(seq: Sequence, reason: FinishReason, stop_reason: str | int | None) -> None:
    seq.finish_reason = reason
    seq.stop_reason = stop_reason


def _finish_at_stop_string(seq: Sequence, checked_len: int) -> None:
    """If a stop string ends in the text added after `checked_len`, cut the text before it and finish."""
    hits = [(seq.text.find(stop, max(0, checked_len - len(stop) + 1)), stop) for stop in seq.request.params.stop]
    hits = [(at, stop) for at, stop in hits if at >= 0]
    if hits:
        at, stop = min(hits)
        seq.text = seq.text[:at]
        _finish(seq, FinishReason.STOP, stop)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string (not streamed yet)."""
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    return held
