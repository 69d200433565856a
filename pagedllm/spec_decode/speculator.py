"""The engine's side of speculation: drafts for the running sequences before a step, outcomes after it."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.model_runner import ModelRunner
from pagedllm.engine.request import Sequence
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.draft_model import RESERVED_DRAFT, DraftModel
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
    """Owns the proposer (or the draft model), the adaptive policy and the counters."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft_runner: ModelRunner | None = None) -> None:
        self.max_model_len = max_model_len
        self.draft_model = DraftModel(draft_runner) if draft_runner is not None else None
        self.proposer: Proposer | None = make_proposer(config) if draft_runner is None else None
        self.policy = SpeculationPolicy(
            config.num_speculative_tokens, config.disable_by_batch_size, config.min_acceptance_rate
        )
        self.stats = SpecDecodeStats()

    def propose(self, running: list[Sequence]) -> None:
        """Set the drafts of each running sequence that decodes this step (none for prefills); a draft model's are
        reserved here and drawn in `draft`."""
        max_length = self.policy.max_draft_length(len(running))
        for seq in running:
            seq.draft_token_ids = []
            seq.draft_probs = None
            room = min(self._room(seq), max_length)
            if room <= 0 or seq.num_uncomputed_tokens != 1:
                continue
            num_tokens = min(room, self.policy.draft_length(seq))
            if num_tokens <= 0:
                continue
            if self.proposer is not None:
                seq.draft_token_ids = self.proposer.propose(seq, seq.token_ids(0, seq.num_tokens), num_tokens)
            else:
                seq.draft_token_ids = [RESERVED_DRAFT] * num_tokens  # drawn by `draft` once scheduled

    def draft(self, out: SchedulerOutput, block_manager: BlockManager) -> None:
        """After scheduling: a draft model computes its K/V for the step and draws the reserved drafts."""
        if self.draft_model is not None:
            self.draft_model.propose(out, block_manager)

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
        seq.draft_probs = None
        if self.proposer is not None:
            self.proposer.finish(seq, seq.output_token_ids)
        if self.draft_model is not None:
            self.draft_model.forget(seq)
        self.policy.forget(seq)
