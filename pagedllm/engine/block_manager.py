"""KV-cache blocks: a free list with reference counts, per-sequence block tables, sharing and copy-on-write."""

from __future__ import annotations

from typing import Protocol

from pagedllm.arithmetic import ceil_div
from pagedllm.engine.prefix_cache import HashedSequence, PrefixCache


class BlockAllocator:
    """Hands out block ids from a free list, least recently released first, and counts the references to each."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered: an LRU queue

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self) -> int:
        if not self.free_ids:
            raise RuntimeError("no free KV-cache block")
        block_id = next(iter(self.free_ids))
        return self.take(block_id)

    def take(self, block_id: int) -> int:
        """Reference a free block chosen by the caller (a prefix-cache hit)."""
        del self.free_ids[block_id]
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
            self.free_ids[block_id] = None


class HasBlocks(Protocol):
    """Anything with a block table and a count of tokens whose K/V is in the cache (a Sequence)."""

    block_ids: list[int]
    num_computed_tokens: int


class BlockManager:
    """Grows, shares and frees the block tables of sequences; a shared partial block is copied before a write.

    With a prefix cache, a new sequence starts from the cached blocks of its longest known prefix.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: PrefixCache | None = None) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache = prefix_cache

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of the cache's blocks in use."""
        return 1 - self.allocator.num_free / self.allocator.num_blocks

    def blocks_needed(self, seq: HasBlocks, num_new_tokens: int) -> int:
        """New blocks to hold `num_new_tokens` more tokens after the computed ones, a copy-on-write included."""
        total = ceil_div(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_ids)) + int(self._needs_copy(seq))

    def can_allocate(self, seq: HasBlocks, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.allocator.num_free

    def allocate_slots(self, seq: HasBlocks, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_new_tokens`; returns (source, destination) block copies the cache must apply first."""
        copies: list[tuple[int, int]] = []
        if self._needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_ids[index]
            private = self._allocate()
            self.allocator.release(shared)
            seq.block_ids[index] = private
            copies.append((shared, private))
        total = ceil_div(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_ids) < total:
            seq.block_ids.append(self._allocate())
        return copies

    def cached_prefix(self, seq: HashedSequence) -> list[int]:
        """Blocks of a new sequence's longest cached prefix (nothing is taken yet)."""
        return self.prefix_cache.lookup(seq) if self.prefix_cache else []

    def can_admit(self, seq: HasBlocks, prefix: list[int], num_new_tokens: int) -> bool:
        """Room for a new sequence that starts from `prefix` and computes `num_new_tokens` after it."""
        new_blocks = ceil_div(len(prefix) * self.block_size + num_new_tokens, self.block_size) - len(prefix)
        revived = sum(1 for block_id in prefix if self.allocator.ref_counts[block_id] == 0)
        return new_blocks + revived <= self.allocator.num_free

    def adopt_prefix(self, seq: HashedSequence, prefix: list[int]) -> None:
        """Start a new sequence from cached blocks: they count as computed."""
        for block_id in prefix:
            if self.allocator.ref_counts[block_id] == 0:
                self.allocator.take(block_id)
            else:
                self.allocator.share(block_id)
        seq.block_ids = list(prefix)
        seq.num_computed_tokens = len(prefix) * self.block_size
        seq.num_registered_blocks = len(prefix)

    def cache_computed_blocks(self, seq: HashedSequence) -> None:
        """Make the sequence's newly full, computed blocks findable by later sequences."""
        if self.prefix_cache:
            self.prefix_cache.register(seq)

    def _allocate(self) -> int:
        block_id = self.allocator.allocate()
        if self.prefix_cache:
            self.prefix_cache.forget(block_id)
        return block_id

    def fork(self, parent: HasBlocks, child: HasBlocks, num_tokens: int | None = None) -> None:
        """Give `child` by reference the parent's blocks that hold its first `num_tokens` tokens (default: all)."""
        num_blocks = len(parent.block_ids) if num_tokens is None else ceil_div(num_tokens, self.block_size)
        child.block_ids = parent.block_ids[:num_blocks]
        for block_id in child.block_ids:
            self.allocator.share(block_id)

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
