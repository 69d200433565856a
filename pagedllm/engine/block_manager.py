"""KV-cache blocks: a free list with reference counts, per-sequence block tables, sharing and copy-on-write."""

from __future__ import annotations

from collections import deque
from typing import Protocol


class BlockAllocator:
    """Hands out block ids from a free list and counts the references to each."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise RuntimeError("no free KV-cache block")
        block_id = self.free_ids.popleft()
        self.ref_counts[block_id] = 1
        return block_id

    def share(self, block_id: int) -> None:
        if self.ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} is not allocated")
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        if self.ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} released more often than referenced")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_ids.append(block_id)


class HasBlocks(Protocol):
    """Anything with a block table and a count of tokens whose K/V is in the cache (a Sequence)."""

    block_ids: list[int]
    num_computed_tokens: int


class BlockManager:
    """Grows, shares and frees the block tables of sequences; a shared partial block is copied before a write."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of the cache's blocks in use."""
        return 1 - self.allocator.num_free / self.allocator.num_blocks

    def blocks_needed(self, seq: HasBlocks, num_new_tokens: int) -> int:
        """New blocks to hold `num_new_tokens` more tokens after the computed ones, a copy-on-write included."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids)) + int(self._needs_copy(seq))

    def can_allocate(self, seq: HasBlocks, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.allocator.num_free

    def allocate_slots(self, seq: HasBlocks, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_new_tokens`; returns (source, destination) block copies the cache must apply first."""
        copies: list[tuple[int, int]] = []
        if self._needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_ids[index]
            private = self.allocator.allocate()
            self.allocator.release(shared)
            seq.block_ids[index] = private
            copies.append((shared, private))
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        while len(seq.block_ids) < total:
            seq.block_ids.append(self.allocator.allocate())
        return copies

    def fork(self, parent: HasBlocks, child: HasBlocks) -> None:
        """Give `child` the parent's blocks by reference."""
        for block_id in parent.block_ids:
            self.allocator.share(block_id)
        child.block_ids = list(parent.block_ids)

    def free(self, seq: HasBlocks) -> None:
        for block_id in reversed(seq.block_ids):
            self.allocator.release(block_id)
        seq.block_ids = []

    def slot(self, seq: HasBlocks, position: int) -> int:
        """Flat cache slot of the token at `position`."""
        return seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _needs_copy(self, seq: HasBlocks) -> bool:
        """The next token lands in a partially filled block that another sequence also references."""
        return (
            seq.num_computed_tokens % self.block_size != 0
            and len(seq.block_ids) * self.block_size > seq.num_computed_tokens
            and self.allocator.ref_counts[seq.block_ids[seq.num_computed_tokens // self.block_size]] > 1
        )
