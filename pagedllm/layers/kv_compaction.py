"""Compaction of one sequence's paged K/V: the kept entries move down over the evicted ones, their keys re-rotated.

The evicting KV-cache policies (engine/kv_cache_policy.py) drop tokens from anywhere in a sequence's cache: the
streaming policy those between its attention sinks and its window, h2o those between its heavy hitters. The kept
entries move to cache positions 0, 1, 2, ... in their order. RoPE rotations compose: a key rotated for position p,
rotated again by -d, is the key rotated for p - d; so each moved key, rotated back by the distance it moved, is
exactly the key of its new cache position, and the attention kernels need no notion of the gaps. Values carry no
position and move as they are. The rotation is done in float32 and rounded once per move; a quantized pool's
entries are dequantized, moved and quantized again.

Sliding-window layers (Gemma 3's local ones) keep their window of the most recent tokens, evicted or not, in blocks
indexed by token position. Their queries rotate for the same cache positions as the whole-context layers', which
drop by the number of tokens that leave; so their keys, which stay where they are, are re-rotated in place by that
number (KVRotation, rounded the same way), and every query-key distance in a window stays the distance between the
two tokens in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedllm.layers.attention import KVPool, cache_basis, gather_context, write_kv
from pagedllm.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class KVCompaction:
    """Move one sequence's cache entry kept[i] to cache position i, for every i."""

    block_table: list[int]  # the sequence's blocks before the move; the kept entries end up in its first ones
    kept: list[int]  # increasing cache positions, each below cache_len
    cache_len: int
    group: int = 0  # the KV-cache group (a whole-context one) whose table block_table is

    @property
    def first_moved(self) -> int:
        return first_moved(self.kept)


@dataclass(frozen=True)
class KVRotation:
    """Re-rotate in place the keys of a sliding-window group's blocks for positions `distance` lower."""

    block_ids: list[int]
    distance: int
    group: int


@dataclass(frozen=True)
class KVEviction:
    """What one sequence's eviction does to the pools, in order: block copies, compactions, rotations."""

    # (source, destination) whole-block copies: the private copies, already in the sequence's tables, of blocks
    # another sequence or the prefix cache still holds
    block_copies: list[tuple[int, int]]
    compactions: list[KVCompaction]  # one per whole-context KV-cache group
    rotations: list[KVRotation] = field(default_factory=list)  # one per sliding-window group holding blocks


def first_moved(kept: list[int]) -> int:
    """The first index i whose kept position is not i: the entries before it stay where they are."""
    return next((i for i, position in enumerate(kept) if position != i), len(kept))


def compact_kv(
    k_pool: KVPool, v_pool: KVPool, rotary: RotaryEmbedding, compaction: KVCompaction, device: torch.device
) -> None:
    """Apply a compaction to one layer's pools: every moved entry is read before any is written."""
    first = compaction.first_moved
    if first == len(compaction.kept):
        return
    block_size = k_pool.shape[1]
    table = torch.tensor(compaction.block_table, dtype=torch.int64, device=device)
    sources = torch.tensor(compaction.kept[first:], dtype=torch.int64, device=device)
    destinations = torch.arange(first, len(compaction.kept), device=device)
    first_read = compaction.kept[first]
    keys, values = (_read_entries(pool, table, first_read, compaction.cache_len) for pool in (k_pool, v_pool))
    keys, values = keys[sources - first_read], values[sources - first_read]
    slots = table[destinations // block_size] * block_size + destinations % block_size
    write_kv(k_pool, v_pool, rotary.shift(keys, sources - destinations), values, slots)


def rotate_kv(
    k_pool: KVPool, v_pool: KVPool, rotary: RotaryEmbedding, rotation: KVRotation, device: torch.device
) -> None:
    """Apply a rotation to one layer's pools: values are written back as they were read."""
    if not rotation.block_ids or not rotation.distance:
        return
    block_size = k_pool.shape[1]
    table = torch.tensor(rotation.block_ids, dtype=torch.int64, device=device)
    end = len(rotation.block_ids) * block_size
    keys, values = (_read_entries(pool, table, 0, end) for pool in (k_pool, v_pool))
    slots = (table[:, None] * block_size + torch.arange(block_size, device=device)).flatten()
    write_kv(k_pool, v_pool, rotary.shift(keys, rotation.distance), values, slots)


def _read_entries(pool: KVPool, table: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """A sequence's entries at cache positions [first, end), in the model's basis."""
    block_size = pool.shape[1]
    first_block = first // block_size
    context = gather_context(pool, table[first_block:], end - first_block * block_size)
    return cache_basis(pool, context[first - first_block * block_size :].contiguous())
