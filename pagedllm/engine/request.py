"""What a user submitted (Request) and the continuations it generates (Sequence, the unit of scheduling)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagedllm.model.tokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.beam_search import BeamSearch


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """A prompt and its sampling settings; its sequences share the prompt's blocks.

    Sampling generates `params.num_samples` sequences; beam search keeps its live beams in `sequences` and
    replaces them with its best hypotheses when it is done.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    beam_search: BeamSearch | None = None

    @property
    def finished(self) -> bool:
        if self.params.use_beam_search:
            # Live beams never carry a finish reason; the hypotheses that replace them all do.
            return bool(self.sequences) and all(s.finish_reason is not None for s in self.sequences)
        done = all(s.finish_reason is not None for s in self.sequences)
        return len(self.sequences) == self.params.num_samples and done

    def generator(self, index: int) -> torch.Generator | None:
        """The sampling generator of sample `index`: seeded from the request's seed, else None (engine-wide)."""
        if self.params.seed is None:
            return None
        return torch.Generator().manual_seed(self.params.seed + index)


@dataclass(eq=False)
class Sequence:
    """One continuation of a request: its tokens, how many have K/V in the cache, and its block table."""

    request: Request
    index: int
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    pending_forks: int = 0  # samples still to be split off this sequence when its first token is drawn
    reserved_slots: int = 0  # beams this sequence will branch into at its first beam-search step
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # proposed continuation, verified by the next step
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache identity of each full block of tokens
    num_registered_blocks: int = 0  # leading full blocks already offered to the prefix cache
    text: str = ""
    emitted_text_len: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt, output = self.request.prompt_token_ids, self.output_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return output[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + output[: end - len(prompt)]

    def spawn_sample(self, index: int) -> Sequence:
        """A new sample of the same request at the same point, before its first token; blocks are shared later."""
        detokenizer = IncrementalDetokenizer(
            self.detokenizer.tokenizer, self.request.prompt_token_ids, self.detokenizer.skip_special_tokens
        )
        child = Sequence(self.request, index, self.request.generator(index), detokenizer)
        child.block_hashes = list(self.block_hashes)
        self.request.sequences.append(child)
        return child

    def branch(self, index: int) -> Sequence:
        """A copy of this beam as it stands (tokens, scores, computed K/V count); the caller shares the blocks."""
        detokenizer = IncrementalDetokenizer(
            self.detokenizer.tokenizer, self.request.prompt_token_ids, self.detokenizer.skip_special_tokens
        )
        return Sequence(
            self.request,
            index,
            None,
            detokenizer,
            output_token_ids=list(self.output_token_ids),
            num_computed_tokens=self.num_computed_tokens,
            block_hashes=list(self.block_hashes),
            num_registered_blocks=self.num_registered_blocks,
            logprobs=list(self.logprobs),
            cumulative_logprob=self.cumulative_logprob,
        )
