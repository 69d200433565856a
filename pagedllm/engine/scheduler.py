"""Iteration-level scheduling: which sequences run this step, and how many of their tokens."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.candidate_branches import CandidateBranch, branch_out, num_scratch_blocks
from pagedllm.engine.request import Sequence
from pagedllm.layers.kv_compaction import KVEviction

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSequence:
    sequence: Sequence
    num_new_tokens: int  # draft tokens included
    forks: list[Sequence] = field(default_factory=list)  # samples split off at this step, sharing its blocks
    num_draft_tokens: int = 0  # the sequence's first drafts, computed after its own tokens to be verified
    # Contrastive search: one branch per candidate for the next position (its one new token, not yet chosen).
    branches: list[CandidateBranch] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence has its K/V, so its next token is sampled."""
        num_verified = self.num_new_tokens - self.num_draft_tokens
        return self.sequence.num_computed_tokens + num_verified == self.sequence.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    kv_evictions: list[KVEviction] = field(default_factory=list)  # applied before the block copies
    preempted: list[Sequence] = field(default_factory=list)
    forked: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Runs decodes and prefill chunks together under a token budget and a sequence limit.

    Running sequences go first, oldest first; waiting ones join while budget, sequence slots and blocks
    last. When a running sequence needs a block and none is free, the newest running sequence is preempted:
    its blocks are freed and it goes back to the front of the queue, to be recomputed later.

    A scheduled sequence is in flight until `complete` takes its batch back: with pipeline micro-batches several
    batches are, and a sequence is in at most one of them. A batch is scheduled from the sequences not in flight;
    one in flight is never preempted (its batch still writes its blocks), so a sequence that finds no other room
    waits for the batches in flight to come back.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.in_flight: set[Sequence] = set()  # scheduled in a batch whose output is not applied yet
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_batch_seqs: int | None = None) -> SchedulerOutput:
        """The next batch, of at most `max_batch_seqs` sequences (default max_num_seqs) not in flight."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        limit = max_batch_seqs or self.max_num_seqs
        blocked = False  # a running sequence found no room: the waiting ones do not take blocks before it
        earlier_batches = bool(self.in_flight)  # their sequences free no blocks now, but will be victims later
        index = 0
        while index < len(self.running) and budget > 0 and len(out.scheduled) < limit:
            seq = self.running[index]
            if seq in self.in_flight:
                index += 1
                continue
            # Tokens an evicting policy drops leave first: their blocks count as free for the room made below.
            eviction = self.block_manager.evict(seq)
            # Drafts count in the budget like any token; those that do not fit wait for a later step. Candidates
            # are rows for the next position; their scratch blocks are held for the step.
            num_branches = seq.contrastive.top_k if seq.awaits_candidates and seq.contrastive else 0
            num_new = min(
                seq.num_uncomputed_tokens + len(seq.draft_token_ids) + min(num_branches, 1),
                budget,
                self.block_manager.cache_room(seq),
            )
            del seq.draft_token_ids[max(0, num_new - seq.num_uncomputed_tokens) :]
            scratch = num_scratch_blocks(self.block_manager, num_branches)
            if not self._make_room(seq, num_new, out, scratch, earlier_batches):
                blocked = True
                break  # preempted (its blocks, and the eviction's, went back), or waiting for a batch in flight
            if eviction is not None:
                out.kv_evictions.append(eviction)
            self._schedule(seq, num_new, out, num_branches)
            budget -= max(num_new, num_branches)
            index += 1
        while self.waiting and budget > 0 and not out.preempted and not blocked and len(out.scheduled) < limit:
            seq = self.waiting[0]
            if self._num_slots_taken() + len(out.forked) + 1 + seq.pending_forks > self.max_num_seqs:
                break
            if not self._admit(seq, budget):
                break
            self.waiting.popleft()
            num_new = min(seq.num_uncomputed_tokens, budget, self.block_manager.cache_room(seq))
            if seq.index == 0 and seq.num_preemptions == 0:
                seq.request.num_cached_tokens = seq.num_computed_tokens
            self.running.append(seq)
            self._schedule(seq, num_new, out)
            budget -= num_new
        self.running += out.forked
        self.in_flight.update(out.forked)
        return out

    def complete(self, out: SchedulerOutput) -> None:
        """The batch `out` has come back: its sequences (and the samples forked off them) are no longer in flight."""
        self.in_flight.difference_update(item.sequence for item in out.scheduled)
        self.in_flight.difference_update(out.forked)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Take a waiting sequence's cached prefix if there is room for it and its next chunk.

        A forked sequence (`LLMEngine.fork_request`) already holds its source's blocks and computed tokens.
        """
        if seq.block_ids:
            return self.block_manager.can_allocate(seq, min(seq.num_uncomputed_tokens, budget))
        # Prompt logprobs come from the prompt's own forward pass: a cached prefix would skip them.
        # So do a contrastive search's context hidden states.
        needs_forward = _awaits_prompt_logprobs(seq) or seq.contrastive is not None
        prefix = [] if needs_forward else self.block_manager.cached_prefix(seq)
        num_new = min(seq.num_tokens - len(prefix) * self.block_manager.block_size, budget)
        if not self.block_manager.can_admit(seq, prefix, num_new):
            return False
        self.block_manager.adopt_prefix(seq, prefix)
        return True

    def _schedule(self, seq: Sequence, num_new: int, out: SchedulerOutput, num_branches: int = 0) -> None:
        out.block_copies += self.block_manager.allocate_slots(seq, num_new)
        item = ScheduledSequence(seq, num_new, num_draft_tokens=len(seq.draft_token_ids))
        if num_branches:
            item.branches, copies = branch_out(self.block_manager, seq, num_branches)
            out.block_copies += copies
        if seq.pending_forks and item.completes:
            item.forks = self._fork(seq, seq.num_computed_tokens + num_new)
            out.forked += item.forks
        out.scheduled.append(item)
        self.in_flight.add(seq)

    def _fork(self, seq: Sequence, num_computed_after_step: int) -> list[Sequence]:
        """Split the request's other samples off `seq` as its prompt completes; they share its blocks."""
        children = [seq.spawn_sample(seq.index + i) for i in range(1, seq.pending_forks + 1)]
        seq.pending_forks = 0
        for child in children:
            self.block_manager.fork(seq, child)
            child.num_computed_tokens = num_computed_after_step
        return children

    def _num_slots_taken(self) -> int:
        """Running sequences plus the samples they will split into."""
        return len(self.running) + sum(seq.pending_forks for seq in self.running)

    def _make_room(
        self, seq: Sequence, num_new: int, out: SchedulerOutput, num_scratch: int, earlier_batches: bool
    ) -> bool:
        """Preempt the newest running sequences not in flight until `seq` (and `num_scratch` more blocks) fits;
        False if `seq` itself had to go, or (with `earlier_batches` in flight) has to wait for them instead."""
        blocks = self.block_manager
        while blocks.blocks_needed(seq, num_new) + num_scratch > blocks.num_free_blocks:
            victim = self._victim(seq, earlier_batches)
            if victim is None:
                return False
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, seq: Sequence, earlier_batches: bool) -> Sequence | None:
        """The newest running sequence not in flight; `seq` itself only where no earlier batch is in flight (else
        None: a sequence of that batch becomes a victim once it is back)."""
        for victim in reversed(self.running):
            if victim is seq:
                return None if earlier_batches else seq
            if victim not in self.in_flight:
                return victim
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_evicted_tokens = 0
        seq.kv_scores = None
        seq.draft_token_ids = []
        if seq.contrastive is not None:
            seq.contrastive.reset()
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s/%d (%d tokens to recompute)", seq.request.request_id, seq.index, seq.num_tokens)

    def finish(self, seq: Sequence, free_blocks: bool = True) -> None:
        """Drop a finished or aborted sequence, freeing its blocks at once unless the caller keeps them (a batch in
        flight may still write them: the ranks run it before any later batch that reuses them)."""
        self.in_flight.discard(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.block_manager.free(seq)


def _awaits_prompt_logprobs(seq: Sequence) -> bool:
    request = seq.request
    return request.params.prompt_logprobs is not None and len(request.prompt_logprobs) < len(request.prompt_token_ids)
