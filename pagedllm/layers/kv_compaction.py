"""Compaction of one sequence's paged K/V: the entries after a gap move down over it, their keys re-rotated.

The streaming KV-cache policy (engine/kv_cache_policy.py) drops the tokens between a sequence's attention sinks and
its window by moving the window down over them. RoPE rotations compose: a key rotated for position p, rotated again
by -d, is the key rotated for p - d; so the moved keys are exactly the keys of their new cache positions, and the
attention kernels need no notion of the gap. Values carry no position and move as they are. The rotation is done in
float32 and rounded once per move; a quantized pool's entries are dequantized, moved and quantized again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.layers.attention import KVPool, cache_basis, gather_context, write_kv
from pagedllm.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class KVCompaction:
    """Move one sequence's cache entries [num_sinks + shift, cache_len) to [num_sinks, cache_len - shift)."""

    block_table: list[int]  # the sequence's blocks before the move; the entries after it stay in its first ones
    num_sinks: int
    shift: int
    cache_len: int


def compact_kv(
    k_pool: KVPool, v_pool: KVPool, rotary: RotaryEmbedding, compaction: KVCompaction, device: torch.device
) -> None:
    """Apply a compaction to one layer's pools: every moved entry is read before any is written."""
    block_size = k_pool.shape[1]
    table = torch.tensor(compaction.block_table, dtype=torch.int64, device=device)
    first, end = compaction.num_sinks + compaction.shift, compaction.cache_len
    keys, values = (_read_entries(pool, table, first, end) for pool in (k_pool, v_pool))
    positions = torch.arange(compaction.num_sinks, end - compaction.shift, device=device)
    slots = table[positions // block_size] * block_size + positions % block_size
    write_kv(k_pool, v_pool, rotary.shift(keys, compaction.shift), values, slots)


def _read_entries(pool: KVPool, table: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """A sequence's entries at cache positions [first, end), in the model's basis."""
    block_size = pool.shape[1]
    first_block = first // block_size
    context = gather_context(pool, table[first_block:], end - first_block * block_size)
    return cache_basis(pool, context[first - first_block * block_size :].contiguous())
