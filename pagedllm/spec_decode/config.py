"""Speculative decoding settings, with vLLM's names: from a dict (Python) or a JSON string (command line)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pagedllm.errors import ConfigError

SpeculativeMethod = Literal["ngram", "suffix", "draft_model"]
METHODS: tuple[str, ...] = get_args(SpeculativeMethod)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How draft tokens are proposed and how many; every field of a running engine's speculation."""

    method: SpeculativeMethod = "ngram"
    num_speculative_tokens: int = 5
    # ngram: the longest n in [prompt_lookup_min, prompt_lookup_max] whose last n tokens occurred before wins.
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # draft_model: the draft's path or embedded name (same tokenizer as the target) and its linear weights'
    # quantization (one of the engine's `quantization` values, checked by EngineConfig; None: the engine's).
    model: str | None = None
    quantization: str | None = None
    # suffix: depth of the suffix trees, finished outputs kept in the shared tree, tokens per matched token, and
    # the least estimated probability a proposed path may have.
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 1000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    # Adaptive speculation: none when this many sequences or more run (the step is compute-bound), and a sequence
    # pauses while its recent acceptance rate is below min_acceptance_rate.
    disable_by_batch_size: int | None = 8
    min_acceptance_rate: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, f.type):
                raise ConfigError(f"speculative_config.{f.name} must be {f.type}, got {value!r}", f.name)
        checks: list[tuple[bool, str, str]] = [
            (self.method in METHODS, "method", f"must be one of {METHODS}"),
            (1 <= self.num_speculative_tokens <= 64, "num_speculative_tokens", "must be in [1, 64]"),
            (self.prompt_lookup_min >= 1, "prompt_lookup_min", "must be >= 1"),
            (self.prompt_lookup_max >= self.prompt_lookup_min, "prompt_lookup_max", "must be >= prompt_lookup_min"),
            (self.method != "draft_model" or bool(self.model), "model", "is required with method draft_model"),
            (self.suffix_decoding_max_tree_depth >= 2, "suffix_decoding_max_tree_depth", "must be >= 2"),
            (self.suffix_decoding_max_cached_requests >= 0, "suffix_decoding_max_cached_requests", "must be >= 0"),
            (self.suffix_decoding_max_spec_factor > 0, "suffix_decoding_max_spec_factor", "must be > 0"),
            (0 <= self.suffix_decoding_min_token_prob <= 1, "suffix_decoding_min_token_prob", "must be in [0, 1]"),
            (
                self.disable_by_batch_size is None or self.disable_by_batch_size >= 1,
                "disable_by_batch_size",
                "must be >= 1",
            ),
            (0 <= self.min_acceptance_rate <= 1, "min_acceptance_rate", "must be in [0, 1]"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"speculative_config.{name} {rule}, got {getattr(self, name)!r}", name)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config from a dict, a JSON object string or a config; None or an empty string or dict: none."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigError(f"speculative_config is not valid JSON: {error}", "speculative_config") from None
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {value!r}", "speculative_config")
        if not value:
            return None
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ConfigError(f"unknown speculative_config setting(s): {names}", "speculative_config")
        return cls(**value)


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a value fits a field's annotation as written here (int, float, str, a Literal or None unions)."""
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return False
    if annotation.startswith(("int", "float")):
        return isinstance(value, int) or (annotation.startswith("float") and isinstance(value, float))
    return isinstance(value, str)
