"""Adaptive speculation: how many drafts each sequence may verify this step.

A verified draft costs a row of the forward pass; it pays when it is accepted. If each draft is accepted with
probability a (the sequence's recent rate), the j-th draft of a step is used with probability a^j, so a sequence
drafts while a^j stays at or above `min_acceptance_rate`; below that rate it pauses, for twice as many steps each
time it fails again. New sequences start from the engine's recent rate.

A step of `disable_by_batch_size` rows is compute-bound: past it, extra rows cost as much as the tokens they might
save. So a batch of that many sequences or more drafts nothing, and a smaller one drafts at most as many tokens per
sequence as keep the step within max(disable_by_batch_size, num_speculative_tokens + 1) rows (a lone sequence always
gets its full draft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.5  # weight of the newest verification in a sequence's rate
ENGINE_SMOOTHING = 0.05  # weight of each verification in the engine-wide rate
MAX_PAUSE_STEPS = 64


@dataclass
class _SequenceState:
    rate: float
    paused_steps: int = 0
    pause_length: int = 1


class SpeculationPolicy:
    """Draft lengths from recent acceptance and batch size; `record` each verification, `forget` finished ones."""

    def __init__(self, num_speculative_tokens: int, disable_by_batch_size: int | None, min_acceptance_rate: float):
        self.num_speculative_tokens = num_speculative_tokens
        self.disable_by_batch_size = disable_by_batch_size
        self.min_acceptance_rate = min_acceptance_rate
        self.engine_rate = 1.0
        self.states: dict[object, _SequenceState] = {}

    def max_draft_length(self, num_running: int) -> int:
        """Drafts per sequence that keep a step over `num_running` sequences within its rows."""
        if self.disable_by_batch_size is None:
            return self.num_speculative_tokens
        if num_running >= self.disable_by_batch_size:
            return 0
        max_rows = max(self.disable_by_batch_size, self.num_speculative_tokens + 1)
        return min(self.num_speculative_tokens, max_rows // max(num_running, 1) - 1)

    def draft_length(self, key: object) -> int:
        """Drafts the sequence may verify this step (0: none); a paused sequence counts down its pause."""
        state = self._state(key)
        if state.paused_steps > 0:
            state.paused_steps -= 1
            return 0
        if state.rate < self.min_acceptance_rate:
            return 1  # a probe after a pause
        if state.rate >= 1 or self.min_acceptance_rate == 0:
            return self.num_speculative_tokens
        useful = math.floor(math.log(self.min_acceptance_rate) / math.log(state.rate) + 1e-9)
        return max(1, min(self.num_speculative_tokens, useful))

    def record(self, key: object, num_drafted: int, num_accepted: int) -> None:
        """One verification's outcome; a rate below the minimum starts (or lengthens) a pause."""
        if num_drafted == 0:
            return
        state = self._state(key)
        rate = num_accepted / num_drafted
        state.rate = (1 - SMOOTHING) * state.rate + SMOOTHING * rate
        self.engine_rate = (1 - ENGINE_SMOOTHING) * self.engine_rate + ENGINE_SMOOTHING * rate
        if state.rate < self.min_acceptance_rate:
            state.paused_steps = state.pause_length
            state.pause_length = min(2 * state.pause_length, MAX_PAUSE_STEPS)
        else:
            state.pause_length = 1

    def forget(self, key: object) -> None:
        self.states.pop(key, None)

    def _state(self, key: object) -> _SequenceState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _SequenceState(self.engine_rate)
        return state
