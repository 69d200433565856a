"""Automatic prefix caching: full KV blocks found again by the tokens they hold and the prefix before them."""

from __future__ import annotations

import hashlib
from array import array
from typing import Protocol

from pagedllm.layers.attention import FREED_BLOCK
from pagedllm.layers.kv_cache_groups import first_visible_block


class HashedSequence(Protocol):
    """A sequence whose full blocks can be hashed (a Sequence)."""

    block_ids: list[int]
    group_block_ids: list[list[int]]
    num_computed_tokens: int
    num_evicted_tokens: int
    block_hashes: list[bytes]
    num_registered_blocks: int

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> list[int]: ...


class PrefixCache:
    """Maps a KV-cache group and a full block's identity — SHA-256 of its parent's identity and its token ids — to
    a block id.

    A cached block stays cached while it is referenced and after it is released, until the allocator hands it
    out again (least recently released first). A hit is confirmed against the block's stored token ids. A prefix of
    k blocks is a hit where every whole-context group has all k cached and every sliding-window group has the
    blocks the query at position k * block_size can see (the ones before went back to the pool long ago).
    """

    def __init__(self, block_size: int, salt: str) -> None:
        self.block_size = block_size
        self.root = hashlib.sha256(salt.encode()).digest()
        self.block_of: dict[tuple[int, bytes], int] = {}
        self.hash_of: dict[int, tuple[int, bytes]] = {}
        self.tokens_of: dict[int, tuple[int, ...]] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0

    def lookup(self, seq: HashedSequence, sliding_windows: list[int | None] | None = None) -> list[list[int]]:
        """Each KV-cache group's table of the longest cached prefix; at least the last token is left to compute."""
        windows = sliding_windows or [None]
        length = (seq.num_tokens - 1) // self.block_size
        for group, window in enumerate(windows):
            if window is None:
                length = self._cached_until(seq, group, 0, length)
        while length > 0 and not all(
            self._cached_until(
                seq, group, first_visible_block(length * self.block_size, window, self.block_size), length
            )
            == length
            for group, window in enumerate(windows)
            if window is not None
        ):
            length -= 1
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += length * self.block_size
        return self.tables(seq, length, windows)

    def tables(self, seq: HashedSequence, length: int, sliding_windows: list[int | None]) -> list[list[int]]:
        """Each group's table of a prefix of `length` blocks that lookup found (FREED_BLOCK out of a window)."""
        tables = []
        for group, window in enumerate(sliding_windows):
            first = 0 if window is None else first_visible_block(length * self.block_size, window, self.block_size)
            blocks = [self._block(seq, group, index) for index in range(first, length)]
            if None in blocks:
                raise RuntimeError("a prefix's blocks left the cache between its lookup and its use")
            tables.append([FREED_BLOCK] * first + blocks)
        return tables

    def register(self, seq: HashedSequence, tables: list[list[int]] | None = None) -> None:
        """Record the blocks of `seq` (in each group's table) that became full and computed since the last call."""
        num_full = seq.num_computed_tokens // self.block_size
        for group, table in enumerate(tables or [seq.block_ids]):
            for index in range(seq.num_registered_blocks, num_full):
                key = (group, self._hash(seq, index))
                block_id = table[index]
                if block_id != FREED_BLOCK and key not in self.block_of and block_id not in self.hash_of:
                    self.block_of[key] = block_id
                    self.hash_of[block_id] = key
                    self.tokens_of[block_id] = tuple(self._tokens(seq, index))
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _block(self, seq: HashedSequence, group: int, index: int) -> int | None:
        """The cached block of a group holding block `index` of the sequence's tokens, if any."""
        block_id = self.block_of.get((group, self._hash(seq, index)))
        if block_id is None or self.tokens_of[block_id] != tuple(self._tokens(seq, index)):
            return None
        return block_id

    def _cached_until(self, seq: HashedSequence, group: int, start: int, end: int) -> int:
        """The first block index in [start, end) the group has not cached; end if it has them all."""
        for index in range(start, end):
            if self._block(seq, group, index) is None:
                return index
        return end

    def forget(self, block_id: int) -> None:
        """The block is being reused for other tokens."""
        block_hash = self.hash_of.pop(block_id, None)
        if block_hash is not None:
            del self.block_of[block_hash]
            del self.tokens_of[block_id]

    def _hash(self, seq: HashedSequence, index: int) -> bytes:
        while len(seq.block_hashes) <= index:
            parent = seq.block_hashes[-1] if seq.block_hashes else self.root
            tokens = array("q", self._tokens(seq, len(seq.block_hashes))).tobytes()
            seq.block_hashes.append(hashlib.sha256(parent + tokens).digest())
        return seq.block_hashes[index]

    def _tokens(self, seq: HashedSequence, index: int) -> list[int]:
        return seq.token_ids(index * self.block_size, (index + 1) * self.block_size)
