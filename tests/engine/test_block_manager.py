"""BlockManager: reference counts, free list, table sizes and copy-on-write under random operation sequences.

Besides the bookkeeping invariants, the state machine simulates the KV cache itself: every token written gets a
unique value stored at the slot the manager hands out (after applying the returned block copies, as the model
runner does), and every sequence must read its own tokens back through its block table after every step. A
write into a block that another table still references would show up there as a corrupted neighbour.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pagedllm.engine.block_manager import BlockAllocator, BlockManager

NUM_SEQS = 4


@dataclass
class FakeSeq:
    block_ids: list[int] = field(default_factory=list)
    group_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: int = 0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 10), block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bm = BlockManager(num_blocks, block_size)
        self.seqs = [FakeSeq() for _ in range(NUM_SEQS)]
        self.contents: list[list[int]] = [[] for _ in range(NUM_SEQS)]  # what each sequence has written
        self.cache: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.next_value = 0

    # --- helpers -------------------------------------------------------------------------------------------

    def _write(self, seq_index: int, num_new: int) -> None:
        """Store fresh values at the slots of the sequence's next positions; each block written must be private."""
        seq = self.seqs[seq_index]
        refs = self.bm.allocator.ref_counts
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
            slot = self.bm.slot(seq, position)
            block, offset = divmod(slot, self.block_size)
            assert block == seq.block_ids[position // self.block_size]
            assert refs[block] == 1, f"write of position {position} into block {block} shared by {refs[block]} tables"
            self.cache[block][offset] = self.next_value
            self.contents[seq_index].append(self.next_value)
            self.next_value += 1
        seq.num_computed_tokens += num_new

    # --- rules ---------------------------------------------------------------------------------------------

    @rule(i=st.integers(0, NUM_SEQS - 1), num_new=st.integers(1, 9))
    def grow(self, i: int, num_new: int) -> None:
        seq = self.seqs[i]
        bm = self.bm
        refs = bm.allocator.ref_counts

        # can_allocate must predict exactly whether allocate_slots succeeds (tried on a throwaway copy).
        trial_bm, trial_seq = copy.deepcopy((bm, seq))
        try:
            trial_bm.allocate_slots(trial_seq, num_new)
            would_succeed = True
        except RuntimeError:
            would_succeed = False
        assert bm.can_allocate(seq, num_new) == would_succeed
        if not would_succeed:
            return

        computed = seq.num_computed_tokens
        index = computed // self.block_size
        shared_partial = computed % self.block_size != 0 and refs[seq.block_ids[index]] > 1
        old_table = list(seq.block_ids)
        old_refs = list(refs)
        free_before = set(bm.allocator.free_ids)

        copies = bm.allocate_slots(seq, num_new)

        if shared_partial:
            assert len(copies) == 1
            src, dst = copies[0]
            assert src == old_table[index]
            assert dst == seq.block_ids[index] and dst != src
            assert dst in free_before
            assert refs[src] == old_refs[src] - 1
            assert refs[dst] == 1
        else:
            assert copies == []
            assert seq.block_ids[: len(old_table)] == old_table
        assert all(b in free_before for b in seq.block_ids[len(old_table) :])
        assert len(seq.block_ids) == ceil_div(computed + num_new, self.block_size)

        for src, dst in copies:  # the model runner applies copies before the forward pass writes
            self.cache[dst] = list(self.cache[src])
        self._write(i, num_new)

    @rule(parent=st.integers(0, NUM_SEQS - 1), child=st.integers(0, NUM_SEQS - 1))
    def fork(self, parent: int, child: int) -> None:
        if parent == child:
            return
        if self.seqs[child].block_ids:
            self.bm.free(self.seqs[child])
        refs_before = list(self.bm.allocator.ref_counts)
        self.bm.fork(self.seqs[parent], self.seqs[child])
        assert self.seqs[child].block_ids == self.seqs[parent].block_ids
        assert self.seqs[child].block_ids is not self.seqs[parent].block_ids
        for block in self.seqs[parent].block_ids:
            assert self.bm.allocator.ref_counts[block] == refs_before[block] + 1
        self.seqs[child].num_computed_tokens = self.seqs[parent].num_computed_tokens
        self.contents[child] = list(self.contents[parent])

    @rule(i=st.integers(0, NUM_SEQS - 1))
    def free(self, i: int) -> None:
        self.bm.free(self.seqs[i])
        assert self.seqs[i].block_ids == []
        self.seqs[i].num_computed_tokens = 0
        self.contents[i] = []

    # --- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def bookkeeping(self) -> None:
        if not hasattr(self, "bm"):
            return
        allocator = self.bm.allocator
        held = Counter(b for seq in self.seqs for b in seq.block_ids)
        for seq in self.seqs:
            assert len(set(seq.block_ids)) == len(seq.block_ids), "a table holds a block twice"
            assert len(seq.block_ids) == ceil_div(seq.num_computed_tokens, self.block_size)
        for block in range(self.num_blocks):
            assert allocator.ref_counts[block] == held[block], f"block {block}"
        free = list(allocator.free_ids)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert set(free) == {b for b in range(self.num_blocks) if allocator.ref_counts[b] == 0}
        assert not set(free) & set(held)
        assert self.bm.num_free_blocks + len(held) == self.num_blocks
        assert self.bm.usage == pytest.approx(len(held) / self.num_blocks)

    @invariant()
    def every_sequence_reads_back_its_own_tokens(self) -> None:
        if not hasattr(self, "bm"):
            return
        for i, seq in enumerate(self.seqs):
            read = [
                self.cache[self.bm.slot(seq, p) // self.block_size][p % self.block_size]
                for p in range(seq.num_computed_tokens)
            ]
            assert read == self.contents[i]

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in self.seqs:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.num_blocks
        assert all(count == 0 for count in self.bm.allocator.ref_counts)
        assert sorted(self.bm.allocator.free_ids) == list(range(self.num_blocks))


BlockManagerMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerStateful = BlockManagerMachine.TestCase


# --- targeted cases ----------------------------------------------------------------------------------------


def test_first_write_after_fork_copies_the_shared_partial_block_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = FakeSeq(), FakeSeq()
    assert bm.allocate_slots(parent, 6) == []  # blocks: one full, one holding 2 of 4 tokens
    parent.num_computed_tokens = 6
    bm.fork(parent, child)
    child.num_computed_tokens = 6
    shared_full, shared_partial = parent.block_ids
    assert bm.allocator.ref_counts[shared_full] == 2 and bm.allocator.ref_counts[shared_partial] == 2
    assert bm.blocks_needed(parent, 1) == 1  # the copy

    copies = bm.allocate_slots(parent, 1)
    assert len(copies) == 1 and copies[0][0] == shared_partial
    private = copies[0][1]
    assert parent.block_ids == [shared_full, private]
    assert child.block_ids == [shared_full, shared_partial]
    assert bm.allocator.ref_counts[shared_partial] == 1
    assert bm.allocator.ref_counts[shared_full] == 2
    parent.num_computed_tokens = 7

    # The child is now the only holder of the partial block: it writes in place.
    assert bm.blocks_needed(child, 1) == 0
    assert bm.allocate_slots(child, 1) == []
    assert child.block_ids == [shared_full, shared_partial]


def test_fork_at_a_block_boundary_needs_no_copy() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = FakeSeq(), FakeSeq()
    bm.allocate_slots(parent, 8)
    parent.num_computed_tokens = 8
    bm.fork(parent, child)
    child.num_computed_tokens = 8
    assert bm.allocate_slots(parent, 1) == []
    assert bm.allocate_slots(child, 1) == []
    assert parent.block_ids[:2] == child.block_ids[:2]
    assert parent.block_ids[2] != child.block_ids[2]


def test_can_allocate_counts_the_copy_block() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    parent, child = FakeSeq(), FakeSeq()
    bm.allocate_slots(parent, 2)
    parent.num_computed_tokens = 2
    bm.fork(parent, child)
    child.num_computed_tokens = 2
    bm.allocate_slots(FakeSeq(), 1)  # take the last free block
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(parent, 1)  # fits in the block, but the block is shared
    bm.free(child)
    assert bm.can_allocate(parent, 1)
    assert bm.allocate_slots(parent, 1) == []


def test_allocator_rejects_double_release_and_sharing_a_free_block() -> None:
    allocator = BlockAllocator(2)
    block = allocator.allocate()
    allocator.release(block)
    with pytest.raises(RuntimeError):
        allocator.release(block)
    with pytest.raises(RuntimeError):
        allocator.share(block)
    assert allocator.num_free == 2
    allocator.allocate()
    allocator.allocate()
    with pytest.raises(RuntimeError):
        allocator.allocate()
