"""Per-request sampling settings, validated where they enter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pagedllm.errors import InvalidArgumentError

MAX_LOGPROBS = 20
INT_FIELDS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs")
OPTIONAL_FIELDS = ("seed", "logprobs", "prompt_logprobs")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; the names follow the OpenAI API and vLLM."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_types()
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1, "n", "must be >= 1"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be between 0 and max_tokens"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (-1 <= self.top_k < 2**62, "top_k", "must be >= 0 (0 or -1 disables it)"),
            (self.seed is None or 0 <= self.seed < 2**62, "seed", "must be in [0, 2**62)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"must be in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise InvalidArgumentError(f"{name} {rule}, got {getattr(self, name)!r}", name)
        if self.top_k == -1:
            self.top_k = 0

    def _check_types(self) -> None:
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) and not (name in OPTIONAL_FIELDS and value is None):
                raise InvalidArgumentError(f"{name} must be an integer, got {value!r}", name)
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}", name)
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise InvalidArgumentError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}", "stop_token_ids")
