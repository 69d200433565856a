"""KV-cache blocks: a free list with reference counts, per-sequence block tables, sharing and copy-on-write.

A model's layers form KV-cache groups (layers/kv_cache_groups.py), each with its own block table per sequence:
group 0's is `block_ids`, the others' `group_block_ids`. A table's entry i holds the block of positions
[i * block_size, (i + 1) * block_size). In a sliding-window group, the blocks no later query can see are released
after every step and their entries become FREED_BLOCK: a sequence there holds at most ceil(window / block_size) + 1
blocks between steps.

Under an evicting policy (streaming or h2o, engine/kv_cache_policy.py) the entry i of a whole-context group's table
holds cache positions [i * block_size, (i + 1) * block_size) instead: a sequence's cache length is its computed
tokens less its evicted ones. Sliding-window groups keep their tables by token position and their own window
(layers/kv_compaction.py says how their keys follow the cache positions).
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch

from pagedllm.arithmetic import ceil_div
from pagedllm.engine.kv_cache_policy import EvictionPolicy
from pagedllm.engine.prefix_cache import HashedSequence, PrefixCache
from pagedllm.layers.attention import FREED_BLOCK
from pagedllm.layers.kv_cache_groups import first_visible_block
from pagedllm.layers.kv_compaction import KVCompaction, KVEviction, KVRotation, first_moved


class BlockAllocator:
    """Hands out block ids from a free list, least recently released first, and counts the references to each."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered: an LRU queue
        self.peak_num_used = 0  # the most blocks referenced at once

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
        self.peak_num_used = max(self.peak_num_used, self.num_blocks - len(self.free_ids))
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
    """Anything with block tables and a count of tokens whose K/V is in the cache (a Sequence)."""

    block_ids: list[int]
    group_block_ids: list[list[int]]
    num_computed_tokens: int
    num_evicted_tokens: int
    kv_scores: torch.Tensor | None


class BlockManager:
    """Grows, shares and frees the block tables of sequences; a shared partial block is copied before a write.

    With a prefix cache, a new sequence starts from the cached blocks of its longest known prefix: in every
    group, the blocks the prefix's next query can see (PrefixCache.lookup).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_cache: PrefixCache | None = None,
        sliding_windows: list[int | None] | None = None,
        eviction: EvictionPolicy | None = None,
    ) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.sliding_windows = sliding_windows or [None]  # one entry per KV-cache group
        self.prefix_cache = prefix_cache
        self.eviction = eviction  # applies to the whole-context groups; its sequences share blocks by the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of the cache's blocks in use."""
        return 1 - self.allocator.num_free / self.allocator.num_blocks

    def tables(self, seq: HasBlocks) -> list[list[int]]:
        """The sequence's block table of each KV-cache group (the lists themselves)."""
        while len(seq.group_block_ids) < len(self.sliding_windows) - 1:
            seq.group_block_ids.append([])
        return [seq.block_ids, *seq.group_block_ids]

    def cache_len(self, seq: HasBlocks) -> int:
        """Tokens whose K/V the sequence's whole-context groups hold."""
        return seq.num_computed_tokens - (seq.num_evicted_tokens if self.eviction else 0)

    def _evicts(self, group: int) -> bool:
        """The group's tables follow the evicting policy (by cache position), not a window (by token position)."""
        return self.eviction is not None and self.sliding_windows[group] is None

    def _table_len(self, seq: HasBlocks, group: int) -> int:
        """The positions the group's table indexes: the cache length, or the computed tokens in a window's."""
        return self.cache_len(seq) if self._evicts(group) else seq.num_computed_tokens

    def cache_room(self, seq: HasBlocks) -> int:
        """The most new tokens the sequence's cache takes in one step: under an evicting policy, the positions
        left below max_model_len (a full cache's requests were checked against it whole)."""
        return sys.maxsize if self.eviction is None else self.eviction.max_cache_len - self.cache_len(seq)

    def evict(self, seq: HasBlocks) -> KVEviction | None:
        """Under an evicting policy, let the tokens it does not keep leave the cache before a step: the blocks past
        the kept ones go back at once, and the returned moves must be applied to the pools before anything is
        written to them. The sequence's accumulated attention scores move with their tokens."""
        if self.eviction is None:
            return None
        cache_len = self.cache_len(seq)
        kept = self.eviction.kept_positions(cache_len, seq.kv_scores)
        if kept is None:
            return None
        num_kept_blocks = ceil_div(len(kept), self.block_size)
        tables = self.tables(seq)
        rewritten = [
            (table, range(first_moved(kept) // self.block_size, num_kept_blocks))
            if self._evicts(group)
            else (table, [i for i, block_id in enumerate(table) if block_id != FREED_BLOCK])
            for group, table in enumerate(tables)
        ]
        copies = self._make_private(rewritten)
        if copies is None:
            return None
        compactions, rotations = [], []
        for group, table in enumerate(tables):
            if not self._evicts(group):
                held = [block_id for block_id in table if block_id != FREED_BLOCK]
                rotations.append(KVRotation(held, cache_len - len(kept), group))
                continue
            compactions.append(KVCompaction(list(table), kept, cache_len, group))
            for block_id in reversed(table[num_kept_blocks:]):
                self.allocator.release(block_id)
            del table[num_kept_blocks:]
        seq.num_evicted_tokens += cache_len - len(kept)
        if seq.kv_scores is not None:
            seq.kv_scores = seq.kv_scores[torch.tensor(kept, device=seq.kv_scores.device)]
        return KVEviction(copies, compactions, rotations)

    def _make_private(self, rewritten: list[tuple[list[int], range | list[int]]]) -> list[tuple[int, int]] | None:
        """Before an eviction rewrites the blocks at the given indices of the sequence's tables: give each one that
        another sequence shares or the prefix cache lists a private copy, so that what others read, or will find,
        never changes. Returns the copies to apply first; None (no eviction this step) when a shared block finds
        no free one."""
        outside = [(table, i) for table, indices in rewritten for i in indices if self._is_shared(table[i])]
        if len(outside) > self.allocator.num_free:
            if any(self.allocator.ref_counts[table[i]] > 1 for table, i in outside):
                return None
            for table, i in outside:  # cached blocks only this sequence holds: no longer findable, rewritten in place
                self.prefix_cache.forget(table[i])  # type: ignore[union-attr]
            return []
        copies = [(table[i], self._allocate()) for table, i in outside]
        for (table, i), (shared, private) in zip(outside, copies):
            table[i] = private
            self.allocator.release(shared)
        return copies

    def _is_shared(self, block_id: int) -> bool:
        """Another sequence references the block, or the prefix cache lists it."""
        listed = self.prefix_cache is not None and block_id in self.prefix_cache.hash_of
        return listed or self.allocator.ref_counts[block_id] > 1

    def blocks_needed(self, seq: HasBlocks, num_new_tokens: int) -> int:
        """New blocks to hold `num_new_tokens` more tokens after the computed ones, copies-on-write included."""
        needed = 0
        for group, table in enumerate(self.tables(seq)):
            length = self._table_len(seq, group)
            total = ceil_div(length + num_new_tokens, self.block_size)
            needed += max(0, total - len(table)) + int(self._needs_copy(table, length))
        return needed

    def blocks_for(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks one sequence of `num_tokens` holds at once, prefilled in chunks of up to `max_chunk`."""
        blocks = ceil_div(num_tokens, self.block_size)
        # During a step a windowed group also holds the window behind the step's first token.
        return sum(
            (blocks if self.eviction is None else self.eviction.max_blocks(num_tokens, max_chunk))
            if window is None
            else min(blocks, ceil_div(window + max_chunk, self.block_size) + 1)
            for window in self.sliding_windows
        )

    def can_allocate(self, seq: HasBlocks, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.allocator.num_free

    def allocate_slots(self, seq: HasBlocks, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_new_tokens`; returns (source, destination) block copies the cache must apply first."""
        copies: list[tuple[int, int]] = []
        for group, table in enumerate(self.tables(seq)):
            length = self._table_len(seq, group)
            total = ceil_div(length + num_new_tokens, self.block_size)
            if self._needs_copy(table, length):
                index = length // self.block_size
                shared = table[index]
                private = self._allocate()
                self.allocator.release(shared)
                table[index] = private
                copies.append((shared, private))
            while len(table) < total:
                table.append(self._allocate())
        return copies

    def release_out_of_window(self, seq: HasBlocks) -> None:
        """Give back the blocks of sliding-window groups that no query after the computed tokens can see."""
        next_position = seq.num_computed_tokens
        for table, window in zip(self.tables(seq), self.sliding_windows):
            if window is None:
                continue
            first_needed = first_visible_block(next_position, window, self.block_size)
            for index in range(min(first_needed, len(table)) - 1, -1, -1):
                if table[index] == FREED_BLOCK:
                    break  # the ones before went back earlier
                self.allocator.release(table[index])
                table[index] = FREED_BLOCK

    def cached_prefix(self, seq: HashedSequence) -> list[int]:
        """Group 0's table of a new sequence's longest cached prefix (nothing is taken yet)."""
        return self.prefix_cache.lookup(seq, self.sliding_windows)[0] if self.prefix_cache else []

    def _prefix_tables(self, seq: HashedSequence, prefix: list[int]) -> list[list[int]]:
        """Every group's table of the prefix whose group-0 table cached_prefix gave."""
        if not prefix or self.prefix_cache is None:
            return [[] for _ in self.sliding_windows]
        return self.prefix_cache.tables(seq, len(prefix), self.sliding_windows)

    def can_admit(self, seq: HashedSequence, prefix: list[int], num_new_tokens: int) -> bool:
        """Room for a new sequence that starts from `prefix` and computes `num_new_tokens` after it."""
        tables = self._prefix_tables(seq, prefix)
        new_blocks = ceil_div(len(prefix) * self.block_size + num_new_tokens, self.block_size) - len(prefix)
        revived = sum(
            1
            for table in tables
            for block_id in table
            if block_id != FREED_BLOCK and self.allocator.ref_counts[block_id] == 0
        )
        return len(tables) * new_blocks + revived <= self.allocator.num_free

    def adopt_prefix(self, seq: HashedSequence, prefix: list[int]) -> None:
        """Start a new sequence from cached blocks: they count as computed."""
        tables = self._prefix_tables(seq, prefix)
        for table in tables:
            for block_id in table:
                if block_id == FREED_BLOCK:
                    continue
                if self.allocator.ref_counts[block_id] == 0:
                    self.allocator.take(block_id)
                else:
                    self.allocator.share(block_id)
        seq.block_ids = tables[0]
        seq.group_block_ids = tables[1:]
        seq.num_computed_tokens = len(prefix) * self.block_size
        seq.num_registered_blocks = len(prefix)

    def cache_computed_blocks(self, seq: HashedSequence) -> None:
        """Make the sequence's newly full, computed blocks findable by later sequences: never once tokens left its
        cache, as its blocks then hold other positions than their index says."""
        if self.prefix_cache and not (self.eviction and seq.num_evicted_tokens):
            self.prefix_cache.register(seq, self.tables(seq))

    def allocate_block(self) -> int:
        """A free block for the caller to fill and release (a contrastive candidate's scratch block)."""
        return self._allocate()

    def _allocate(self) -> int:
        block_id = self.allocator.allocate()
        if self.prefix_cache:
            self.prefix_cache.forget(block_id)
        return block_id

    def fork(self, parent: HasBlocks, child: HasBlocks, num_tokens: int | None = None) -> None:
        """Give `child` by reference the parent's blocks that hold its first `num_tokens` tokens (default: all)."""
        tables = self.tables(parent)
        num_blocks = None if num_tokens is None else ceil_div(num_tokens, self.block_size)
        tables = [table[:num_blocks] for table in tables]
        for table in tables:
            for block_id in table:
                if block_id != FREED_BLOCK:
                    self.allocator.share(block_id)
        child.block_ids = tables[0]
        child.group_block_ids = tables[1:]

    def free_rejected(self, seq: HasBlocks) -> None:
        """Release the blocks past the sequence's computed tokens: they held only rejected drafts, were allocated
        for them and are referenced by no one else (never shared, never offered to the prefix cache)."""
        num_needed = -(-seq.num_computed_tokens // self.block_size)
        while len(seq.block_ids) > num_needed:
            self.allocator.release(seq.block_ids.pop())

    def free(self, seq: HasBlocks) -> None:
        for table in self.tables(seq):
            for block_id in reversed(table):
                if block_id != FREED_BLOCK:
                    self.allocator.release(block_id)
        seq.block_ids = []
        seq.group_block_ids = []

    def slot(self, seq: HasBlocks, position: int, group: int = 0) -> int:
        """Flat cache slot of the token at `position` in a KV-cache group's pools."""
        table = seq.block_ids if group == 0 else seq.group_block_ids[group - 1]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def _needs_copy(self, table: list[int], length: int) -> bool:
        """The next token, after the table's first `length` positions, lands in a partially filled block that
        another sequence also references."""
        return (
            length % self.block_size != 0
            and len(table) * self.block_size > length
            and self.allocator.ref_counts[table[length // self.block_size]] > 1
        )
