"""Compaction of a sequence's paged K/V: moved keys are the keys of their new positions, values move unchanged."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import RopeScaling
from pagedllm.layers.attention import gather_context, write_kv
from pagedllm.layers.kv_compaction import KVCompaction, KVRotation, compact_kv, rotate_kv
from pagedllm.layers.kv_quant import QuantizedKVPool
from pagedllm.layers.rotary import RotaryEmbedding

BLOCK, HEADS, HEAD_DIM = 4, 2, 16
CPU = torch.device("cpu")


def pools(quantized: bool) -> tuple:
    if quantized:
        return tuple(QuantizedKVPool(8, BLOCK, HEADS, HEAD_DIM, 8, torch.float32, CPU) for _ in range(2))
    return tuple(torch.zeros(8, BLOCK, HEADS, HEAD_DIM) for _ in range(2))


SINKS_AND_WINDOW = [*range(3), *range(12, 19)]  # the streaming policy's: one gap after the sinks
SCATTERED = [1, 2, 5, 6, 7, 11, 15, 16, 17, 18]  # h2o's: heavy hitters anywhere, then the recent tokens


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("kept", [SINKS_AND_WINDOW, SCATTERED])
def test_kept_entries_equal_entries_written_at_their_new_positions(quantized: bool, kept: list[int]) -> None:
    rotary = RotaryEmbedding(HEAD_DIM, 64, 10000.0, RopeScaling())
    table = [5, 2, 7, 0, 3]  # 20 slots, scattered blocks
    cache_len = 19
    keys, values = torch.randn(cache_len, HEADS, HEAD_DIM), torch.randn(cache_len, HEADS, HEAD_DIM)
    k_pool, v_pool = pools(quantized)
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cache_len)])
    write_kv(k_pool, v_pool, rotary.rotate(torch.arange(cache_len), keys), values, slots)

    compact_kv(k_pool, v_pool, rotary, KVCompaction(table, kept, cache_len), CPU)

    expected_k, expected_v = pools(quantized)
    new_len = len(kept)
    write_kv(expected_k, expected_v, rotary.rotate(torch.arange(new_len), keys[kept]), values[kept], slots[:new_len])
    table_tensor = torch.tensor(table)
    for pool, expected in ((k_pool, expected_k), (v_pool, expected_v)):
        got, want = (gather_context(p, table_tensor, new_len) for p in (pool, expected))
        tolerance = 0.05 if quantized else 1e-5
        assert torch.allclose(got, want, atol=tolerance)


@pytest.mark.parametrize("quantized", [False, True])
def test_rotated_blocks_hold_the_keys_of_positions_distance_lower(quantized: bool) -> None:
    """A sliding-window group's blocks stay where they are: keys become those of positions `distance` lower."""
    rotary = RotaryEmbedding(HEAD_DIM, 64, 10000.0, RopeScaling())
    blocks, distance, first = [6, 1], 13, 20  # positions 20..27 in two scattered blocks
    keys, values = torch.randn(8, HEADS, HEAD_DIM), torch.randn(8, HEADS, HEAD_DIM)
    slots = torch.tensor([blocks[i // BLOCK] * BLOCK + i % BLOCK for i in range(8)])
    k_pool, v_pool = pools(quantized)
    write_kv(k_pool, v_pool, rotary.rotate(torch.arange(first, first + 8), keys), values, slots)

    rotate_kv(k_pool, v_pool, rotary, KVRotation(blocks, distance, group=1), CPU)

    expected_k, expected_v = pools(quantized)
    shifted = torch.arange(first - distance, first - distance + 8)
    write_kv(expected_k, expected_v, rotary.rotate(shifted, keys), values, slots)
    table = torch.tensor(blocks)
    for pool, expected in ((k_pool, expected_k), (v_pool, expected_v)):
        got, want = (gather_context(p, table, 8) for p in (pool, expected))
        assert torch.allclose(got, want, atol=0.05 if quantized else 1e-5)
