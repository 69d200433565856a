"""A test-only fault injection point: chosen engine steps raise, so tests can prove a failed step is survived.

`PAGEDLLM_INJECT_STEP_FAULTS` lists step numbers, comma-separated, counted from 1 over the steps that ran a batch;
each of those steps raises InjectedFault after scheduling and before the model runs, the point where a kernel error
or an out-of-memory would strike. Unset (always, outside tests), a step pays one set lookup.
"""

from __future__ import annotations

import os

from pagedllm.errors import ConfigError

ENV = "PAGEDLLM_INJECT_STEP_FAULTS"


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


class StepFaults:
    """Counts steps and raises InjectedFault on the chosen ones."""

    def __init__(self, steps: frozenset[int] = frozenset()) -> None:
        self.steps = steps
        self.num_steps = 0

    @classmethod
    def from_environment(cls) -> StepFaults:
        text = os.environ.get(ENV, "").strip()
        try:
            return cls(frozenset(int(part) for part in text.split(",") if part.strip()))
        except ValueError as error:
            raise ConfigError(f"{ENV} must list step numbers separated by commas, got {text!r}") from error

    def check(self) -> None:
        """Count one step; raise if it is one of the chosen."""
        self.num_steps += 1
        if self.num_steps in self.steps:
            raise InjectedFault(f"fault injected at step {self.num_steps} ({ENV})")
