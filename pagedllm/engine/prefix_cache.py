"""Automatic prefix caching: full KV blocks found again by the tokens they hold and the prefix before them."""

from __future__ import annotations

import hashlib
from array import array
from typing import Protocol


class HashedSequence(Protocol):
    """A sequence whose full blocks can be hashed (a Sequence)."""

    block_ids: list[int]
    num_computed_tokens: int
    block_hashes: list[bytes]
    num_registered_blocks: int

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> list[int]: ...


class PrefixCache:
    """Maps a full block's identity — SHA-256 of its parent's identity and its token ids — to a block id.

    A cached block stays cached while it is referenced and after it is released, until the allocator hands it
    out again (least recently released first). A hit is confirmed against the block's stored token ids.
    """

    def __init__(self, block_size: int, salt: str) -> None:
        self.block_size = block_size
        self.root = hashlib.sha256(salt.encode()).digest()
        self.block_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.tokens_of: dict[int, tuple[int, ...]] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0

    def lookup(self, seq: HashedSequence) -> list[int]:
        """Block ids of the longest cached prefix; at least the last token is always left to compute."""
        num_full = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for index in range(num_full):
            block_id = self.block_of.get(self._hash(seq, index))
            if block_id is None or self.tokens_of[block_id] != tuple(self._tokens(seq, index)):
                break
            hits.append(block_id)
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += len(hits) * self.block_size
        return hits

    def register(self, seq: HashedSequence) -> None:
        """Record the blocks of `seq` that became full and computed since the last call."""
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(seq.num_registered_blocks, num_full):
            block_hash = self._hash(seq, index)
            block_id = seq.block_ids[index]
            if block_hash not in self.block_of and block_id not in self.hash_of:
                self.block_of[block_hash] = block_id
                self.hash_of[block_id] = block_hash
                self.tokens_of[block_id] = tuple(self._tokens(seq, index))
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

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
