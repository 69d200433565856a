"""The engine's side of speculation: drafts for the running sequences before a step, outcomes after it."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.engine.request import Sequence
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.policy import SpeculationPolicy
from pagedllm.spec_decode.proposer import Proposer, make_proposer


@dataclass
class SpecDecodeStats:
    """Counters of verification over the engine's life."""

    num_drafts: int = 0  # sequence-steps that verified at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification: the accepted drafts and the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculator:
    """Owns the proposer, the adaptive policy and the counters."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.proposer: Proposer = make_proposer(config)
        self.policy = SpeculationPolicy(
            config.num_speculative_tokens, config.disable_by_batch_size, config.min_acceptance_rate
        )
        self.stats = SpecDecodeStats()

    def propose(self, running: list[Sequence]) -> None:
        """Set the drafts of each running sequence that decodes this step (none for prefills)."""
        speculates = self.policy.speculates(len(running))
        for seq in running:
            seq.draft_token_ids = []
            room = self._room(seq)
            if not speculates or room <= 0 or seq.num_uncomputed_tokens != 1:
                continue
            num_tokens = min(room, self.policy.draft_length(seq))
            if num_tokens > 0:
                seq.draft_token_ids = self.proposer.propose(seq, seq.token_ids(0, seq.num_tokens), num_tokens)

    def _room(self, seq: Sequence) -> int:
        """Drafts that could still be used: the step's own token comes on top, within max_tokens and the context.

        None for a sequence under a grammar: its mask covers the step's first token only, not the drafts after it.
        """
        params = seq.request.params
        if params.structured_outputs is not None:
            return 0
        return min(params.max_tokens - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens)

    def verified(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_drafted
        self.stats.num_accepted_tokens += num_accepted
        self.policy.record(seq, num_drafted, num_accepted)

    def finished(self, seq: Sequence) -> None:
        """A sequence is done: forget its state; its output may serve later sequences."""
        seq.draft_token_ids = []
        self.proposer.finish(seq, seq.output_token_ids)
        self.policy.forget(seq)
