"""What a user submitted (Request) and the continuations it generates (Sequence, the unit of scheduling)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pagedllm.layers.contrastive import ContrastiveState
from pagedllm.model.tokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """A prompt and its sampling settings; its `params.n` sequences share the prompt's blocks.

    With `keep_kv`, a finished sequence keeps its blocks until the engine is told to release them, so that
    requests forked from it (`LLMEngine.fork_request`) start from its computed K/V.
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
    keep_kv: bool = False

    @property
    def finished(self) -> bool:
        done = all(s.finish_reason is not None for s in self.sequences)
        return len(self.sequences) == self.params.n and done

    def generator(self, index: int, device: torch.device) -> torch.Generator | None:
        """The sampling generator of sample `index`: seeded from the request's seed, else None (engine-wide)."""
        if self.params.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.params.seed + index)


@dataclass(eq=False)
class Sequence:
    """One continuation of a request: its tokens, how many have K/V in the cache, and its block table."""

    request: Request
    index: int
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_evicted_tokens: int = 0  # tokens that left the cache under an evicting policy (kv_cache_policy.py)
    kv_scores: torch.Tensor | None = None  # h2o: the attention each cache position received, summed (float32)
    block_ids: list[int] = field(default_factory=list)  # of KV-cache group 0
    group_block_ids: list[list[int]] = field(default_factory=list)  # of the other KV-cache groups, in order
    pending_forks: int = 0  # samples still to be split off this sequence when its first token is drawn
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)  # proposed continuation, verified by the next step
    draft_probs: torch.Tensor | None = None  # [len(draft_token_ids), vocab] what they were drawn from; None: one-hot
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache identity of each full block of tokens
    num_registered_blocks: int = 0  # leading full blocks already offered to the prefix cache
    text: str = ""
    emitted_text_len: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    contrastive: ContrastiveState | None = None  # under contrastive search: its hidden states and candidates

    @property
    def awaits_candidates(self) -> bool:
        """Under contrastive search, every token has its K/V and the next step scores the next token's candidates."""
        return self.contrastive is not None and bool(self.contrastive.candidate_ids) and self.num_uncomputed_tokens == 0

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
        generator = None if self.generator is None else self.request.generator(index, self.generator.device)
        child = Sequence(self.request, index, generator, detokenizer)
        child.block_hashes = list(self.block_hashes)
        self.request.sequences.append(child)
        return child
