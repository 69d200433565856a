"""Per-request sampling settings, validated where they enter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pagedllm.errors import InvalidArgumentError
from pagedllm.structured_output.params import StructuredOutputsParams

MAX_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias
# Sample i of a request draws from a generator seeded with seed + i, all within torch's seed range.
MAX_SEED = 2**62 - 1
# Beyond it every distribution is flat to float precision: a larger value is a mistake, not a setting.
MAX_TEMPERATURE = 100.0
INT_FIELDS = ("n", "best_of", "beam_width", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs")
OPTIONAL_FIELDS = ("best_of", "beam_width", "seed", "logprobs", "prompt_logprobs")
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "length_penalty",
    "penalty_alpha",
)
# Settings that would change a beam's score; beam search ranks by the model's own log-probabilities.
NOT_WITH_BEAM_SEARCH = ("repetition_penalty", "presence_penalty", "frequency_penalty", "stop")
# DoLa's named premature-layer buckets (layers/dola.py), or explicit indices of transformers' hidden_states.
DOLA_BUCKETS = ("low", "high")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; the names follow the OpenAI API and vLLM.

    `best_of` (default n) samples are drawn and the n with the highest cumulative logprob are returned.
    With `use_beam_search`, `beam_width` beams (default: best_of if given, else n) search for the most likely
    continuations as transformers' `generate(num_beams=beam_width, do_sample=False)` does, and the n best
    hypotheses come back, best first. Beam search ignores temperature, top-k/top-p/min-p and seed.

    With `penalty_alpha` > 0, contrastive search (Su et al. 2022) picks each token among the `top_k` most likely
    by (1 - alpha) p(v) - alpha max cos(h_v, h_context); it is deterministic and ignores temperature, top-p, min-p
    and seed. `dola_layers` ("low", "high" or hidden-state indices) turns on DoLa (Chuang et al. 2023): the logits
    become log p_final - log p_premature over the plausible tokens before the other settings apply.
    """

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
    best_of: int | None = None
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    penalty_alpha: float = 0.0  # contrastive search's degeneration penalty; 0 turns it off
    dola_layers: str | list[int] | None = None  # "low", "high" or premature layers' hidden-state indices

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_types()
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1, "n", "must be >= 1"),
            (self.best_of is None or self.best_of >= self.n, "best_of", "must be >= n"),
            (
                self.beam_width is None or (self.use_beam_search and self.beam_width >= self.n),
                "beam_width",
                "must be >= n, with use_beam_search",
            ),
            (
                isinstance(self.early_stopping, bool) or self.early_stopping == "never",
                "early_stopping",
                "must be true, false or 'never'",
            ),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be between 0 and max_tokens"),
            (0 <= self.temperature <= MAX_TEMPERATURE, "temperature", f"must be in [0, {MAX_TEMPERATURE:g}]"),
            (-1 <= self.top_k < 2**62, "top_k", "must be >= 0 (0 or -1 disables it)"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, "seed", "must be in [0, 2**62 - 1]"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (0 <= self.penalty_alpha <= 1, "penalty_alpha", "must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"must be in [0, {MAX_LOGPROBS}]",
            ),
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
        self._check_logit_bias()
        if self.use_beam_search:
            self._check_beam_search()
        if self.penalty_alpha > 0:
            self._check_contrastive_search()
        if self.dola_layers is not None:
            self._check_dola()

    @property
    def uses_contrastive_search(self) -> bool:
        return self.penalty_alpha > 0

    def _check_contrastive_search(self) -> None:
        if self.top_k <= 1:
            raise InvalidArgumentError(
                f"penalty_alpha needs top_k > 1 (the candidates per step), got top_k={self.top_k}", "top_k"
            )
        refused = {
            "use_beam_search": self.use_beam_search,
            "n": self.n > 1,
            "best_of": self.best_of is not None and self.best_of > 1,
            "logprobs": self.logprobs is not None,
            "structured_outputs": self.structured_outputs is not None,
            "dola_layers": self.dola_layers is not None,
        }
        for name, given in refused.items():
            if given:
                raise InvalidArgumentError(f"{name} is not supported with penalty_alpha (contrastive search)", name)

    def _check_dola(self) -> None:
        layers = self.dola_layers
        named = isinstance(layers, str) and layers in DOLA_BUCKETS
        indices = isinstance(layers, list) and bool(layers) and all(_is_int(i) and i >= 0 for i in layers)
        if not (named or indices):
            raise InvalidArgumentError(
                f"dola_layers must be 'low', 'high' or a non-empty list of layer indices >= 0, got {layers!r}",
                "dola_layers",
            )
        if self.use_beam_search:
            raise InvalidArgumentError("dola_layers is not supported with use_beam_search", "dola_layers")

    @property
    def num_samples(self) -> int:
        """Sequences sampled for the request (best_of), of which n are returned; 1 for beam search."""
        return 1 if self.use_beam_search else self.best_of or self.n

    def _check_logit_bias(self) -> None:
        for token, bias in (self.logit_bias or {}).items():
            if not _is_int(token) or token < 0:
                raise InvalidArgumentError(f"logit_bias keys must be token ids >= 0, got {token!r}", "logit_bias")
            if not isinstance(bias, int | float) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise InvalidArgumentError(
                    f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], got {bias!r}",
                    "logit_bias",
                )

    def _check_beam_search(self) -> None:
        defaults = SamplingParams()
        if self.structured_outputs is not None:
            raise InvalidArgumentError("structured_outputs is not supported with use_beam_search", "use_beam_search")
        for name in NOT_WITH_BEAM_SEARCH:
            if getattr(self, name) != getattr(defaults, name):
                raise InvalidArgumentError(f"{name} is not supported with use_beam_search", name)
        if self.beam_width is None:
            self.beam_width = self.best_of or self.n

    def _check_types(self) -> None:
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) and not (name in OPTIONAL_FIELDS and value is None):
                raise InvalidArgumentError(f"{name} must be an integer, got {value!r}", name)
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}", name)
        if not isinstance(self.use_beam_search, bool):
            message = f"use_beam_search must be a boolean, got {self.use_beam_search!r}"
            raise InvalidArgumentError(message, "use_beam_search")
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise InvalidArgumentError(
                f"stop_token_ids must be integers, got {self.stop_token_ids!r}", "stop_token_ids"
            )
