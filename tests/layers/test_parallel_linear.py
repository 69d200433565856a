"""Tensor-parallel layers on 2 ranks against the same layers unsharded, dense and quantized."""

from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F

from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.launch import spawn_ranks
from pagedllm.errors import ConfigError
from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.attention import HeadGroups
from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.parallel_linear import (
    ColumnParallelLinear,
    HeadShard,
    ParallelLMHead,
    RowBlock,
    RowParallelLinear,
    VocabParallelEmbedding,
    attention_blocks,
    attention_rows,
    balanced_channels,
    column_unit,
    head_shard,
    linear_for,
    select_input_columns,
    select_output_rows,
    shard_index,
    shard_units,
    vocab_range,
)
from pagedllm.layers.quantization import LinearQuantization, RowStackedWeight, dequantize, fuse_rows, quantize_int4
from pagedllm.model.lazy_weights import stored_layout
from tests.gguf_blocks import random_blocks

Q = gguf.GGMLQuantizationType

# Shards of whole 32-column runs, so sharded and whole layers take the same kernels.
HIDDEN, HEAD_DIM, NUM_HEADS, INTERMEDIATE, VOCAB = 64, 32, 6, 128, 101
METHODS = ("none", "int8", "int4")


def test_units_split_as_evenly_as_they_go() -> None:
    assert [shard_units(4, r, 2) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [shard_units(3, r, 2) for r in range(2)] == [range(0, 1), range(1, 3)]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        shard_units(2, 0, 3)


def test_query_heads_split_evenly_and_ranks_hold_the_kv_heads_they_read() -> None:
    # SmolLM2 on 2 ranks: query heads 0-3 and 4-8 of 9; K/V head 1 (query heads 3-5) is held by both.
    assert [head_shard(9, 3, r, 2) for r in range(2)] == [
        HeadShard(range(0, 4), range(0, 2), HeadGroups(3, 0)),
        HeadShard(range(4, 9), range(1, 3), HeadGroups(3, 1)),
    ]
    # Whole groups where the K/V heads split evenly: nothing held twice.
    assert [head_shard(32, 8, r, 2).kv_heads for r in range(2)] == [range(0, 4), range(4, 8)]
    assert head_shard(32, 8, 1, 2).groups == HeadGroups(4, 0)
    # MQA: the one K/V head on every rank, read from the middle of its group on rank 1.
    assert [head_shard(4, 1, r, 2) for r in range(2)] == [
        HeadShard(range(0, 2), range(0, 1), HeadGroups(4, 0)),
        HeadShard(range(2, 4), range(0, 1), HeadGroups(4, 2)),
    ]
    q_block, kv_block = attention_blocks(9, 3, 2, 2)
    assert shard_index([q_block, kv_block, kv_block], 1, 2).tolist() == [*range(8, 18), 20, 21, 22, 23, 26, 27, 28, 29]


def test_mlp_channels_split_evenly_extra_runs_to_the_lighter_attention() -> None:
    """SmolLM2 on 2 ranks: 4 query heads and 2 K/V heads against 5 and 2; the MLP's 1,536 channels in runs of 32."""
    rows = attention_rows(9, 3, 64, 2)
    assert rows == [2 * 4 * 64 + 2 * 2 * 64, 2 * 5 * 64 + 2 * 2 * 64]
    channels = balanced_channels(1536, rows, 32)
    assert [channels.units(r, 2) for r in range(2)] == [range(0, 24), range(24, 48)]
    # 5 runs over 2 ranks: the extra one to the rank with fewer attention rows, wherever it stands.
    assert balanced_channels(5 * 32, rows, 32).spans == (range(0, 3), range(3, 5))
    assert balanced_channels(5 * 32, rows[::-1], 32).spans == (range(0, 2), range(2, 5))
    spans = balanced_channels(1536 + 2 * 32, [512, 1024, 512, 1024], 32).spans
    assert [len(span) for span in spans] == [13, 12, 13, 12]
    assert balanced_channels(100, rows, 32) == RowBlock(100)  # runs that do not divide the channels: even
    assert balanced_channels(32, rows, 32) == RowBlock(32)  # fewer runs than ranks


def test_channel_runs_keep_blocks_and_groups_whole() -> None:
    dense = stored_layout(torch.randn(8, 512))
    assert column_unit(dense, LinearQuantization("none")) == 32
    assert column_unit(dense, LinearQuantization("int4", group_size=128)) == 128
    assert column_unit(stored_layout(quantize_int4(torch.randn(8, 512), 64)), LinearQuantization("auto")) == 64
    blocks = stored_layout(gguf_weight(Q.Q4_K, 8, 512, 0))
    assert column_unit(blocks, LinearQuantization("auto")) == 256
    assert column_unit(blocks, LinearQuantization("none")) == 32  # dequantized: any run the kernels take


def test_vocab_ranges_cover_the_vocabulary_once() -> None:
    ranges = [vocab_range(VOCAB, r, 3) for r in range(3)]
    assert [t for r in ranges for t in r] == list(range(VOCAB))


def test_int4_columns_are_sliced_along_whole_groups() -> None:
    weight = quantize_int4(torch.randn(8, 128), 32)
    part = select_input_columns(weight, range(64, 128))
    assert torch.equal(dequantize(part), dequantize(weight)[:, 64:])
    with pytest.raises(ValueError, match="whole int4 groups"):
        select_input_columns(weight, range(48, 96))


def gguf_weight(qtype: Q, out_features: int, in_features: int, seed: int) -> GGUFWeight:
    return GGUFWeight(torch.from_numpy(random_blocks(qtype, out_features, in_features, seed)), int(qtype))


def test_gguf_rows_are_whole_rows_of_blocks_and_columns_whole_blocks() -> None:
    # q/k/v as a Q4_K_M file stores them (Q4_K q and k, Q6_K v): rows taken from each part they fall in.
    parts = [gguf_weight(Q.Q4_K, 8, 256, 1), gguf_weight(Q.Q4_K, 4, 256, 2), gguf_weight(Q.Q6_K, 4, 256, 3)]
    qkv = fuse_rows(parts, torch.float32)
    index = torch.tensor([2, 3, 8, 9, 12, 13])
    rows = select_output_rows(qkv, index)
    assert isinstance(rows, RowStackedWeight) and len(rows.parts) == 3
    assert torch.equal(dequantize(rows), dequantize(qkv)[index])
    assert torch.equal(dequantize(select_output_rows(qkv, torch.arange(4))), dequantize(qkv)[:4])  # one part
    down = gguf_weight(Q.Q8_0, 8, 128, 4)
    assert torch.equal(dequantize(select_input_columns(down, range(32, 96))), dequantize(down)[:, 32:96])
    with pytest.raises(ConfigError, match="quantization=none or int4"):
        select_input_columns(down, range(48, 128))  # starts inside a block of 32
    with pytest.raises(ConfigError, match="Q4_K"):
        select_input_columns(parts[0], range(0, 128))  # half a block of 256


def _reference(weight: torch.Tensor, quantization: LinearQuantization, lm_head: bool = False) -> torch.nn.Module:
    return linear_for(quantization.prepare(weight, torch.float32, lm_head), None, torch.float32, 0)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the order of float32 sums (partial sums per rank, then their all-reduce)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _check_attention_projections(group: ParallelGroup, quantization: LinearQuantization) -> None:
    x = torch.randn(5, HIDDEN)
    # 3 query heads a rank: over 3 K/V heads (the middle one on both ranks), 2 (one each) and 1 (on both).
    for num_kv_heads, local_kv_heads in ((3, (2, 2)), (2, (1, 1)), (1, (1, 1))):
        qkv = torch.randn((NUM_HEADS + 2 * num_kv_heads) * HEAD_DIM, HIDDEN)
        q_block, kv_block = attention_blocks(NUM_HEADS, num_kv_heads, HEAD_DIM, group.world_size)
        layer = ColumnParallelLinear(HIDDEN, [q_block, kv_block, kv_block], group)
        layer.load(qkv, None, torch.float32, quantization)
        assert layer.local_rows(0) == 3 * HEAD_DIM and layer.local_rows(1) == local_kv_heads[group.rank] * HEAD_DIM
        _close(layer(x), _reference(qkv, quantization)(x)[:, layer.index])
        heads_out = torch.randn(5, NUM_HEADS * HEAD_DIM)
        o_proj, bias = torch.randn(HIDDEN, NUM_HEADS * HEAD_DIM), torch.randn(HIDDEN)
        row = RowParallelLinear(q_block, HIDDEN, group, bias=True)
        row.load(o_proj, bias, torch.float32, quantization)
        mine = heads_out[:, row.columns.start : row.columns.stop]
        assert row.columns.start == layer.index[0]  # the query heads this rank computed
        _close(row(mine), _reference(o_proj, quantization)(heads_out) + bias)


def _check_mlp(group: ParallelGroup, quantization: LinearQuantization) -> None:
    x = torch.randn(3, HIDDEN)
    gate_up, down = torch.randn(2 * INTERMEDIATE, HIDDEN), torch.randn(HIDDEN, INTERMEDIATE)
    column = ColumnParallelLinear(HIDDEN, [RowBlock(INTERMEDIATE), RowBlock(INTERMEDIATE)], group)
    column.load(gate_up, None, torch.float32, quantization)
    row = RowParallelLinear(RowBlock(INTERMEDIATE), HIDDEN, group)
    row.load(down, None, torch.float32, quantization)
    expected = _reference(down, quantization)(silu_and_mul(_reference(gate_up, quantization)(x)))
    _close(row(silu_and_mul(column(x))), expected)


def _check_vocabulary(group: ParallelGroup, quantization: LinearQuantization) -> None:
    table = torch.randn(VOCAB, HIDDEN)
    ids = torch.tensor([0, 49, 50, 51, 100, 7])  # both ranks' tokens (rank 0 holds 0..49)
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, group)
    embedding.load(table, torch.float32)
    assert torch.equal(embedding(ids), F.embedding(ids, table))  # a sum with zeros: exact
    hidden = torch.randn(4, HIDDEN)
    lm_head = ParallelLMHead(HIDDEN, VOCAB, group)
    lm_head.load(table, torch.float32, quantization)
    logits = lm_head(hidden)
    assert logits.shape == (4, VOCAB)
    _close(logits, _reference(table, quantization, lm_head=True)(hidden))
    lm_head.gather = False  # each rank's own columns, bit for bit those the gather put together
    assert torch.equal(lm_head(hidden), logits[:, lm_head.tokens.start : lm_head.tokens.stop])


def _check_gguf_blocks(group: ParallelGroup) -> None:
    """Layers over GGUF blocks, kept as blocks on every rank, against the whole layers over the same blocks."""
    auto = LinearQuantization("auto", dense_matmul_min_rows=0)
    x = torch.randn(5, 256)
    # 6 query heads over 3 K/V heads: the middle K/V head's rows taken by both ranks.
    q_block, kv_block = attention_blocks(6, 3, 16, group.world_size)
    parts = [gguf_weight(Q.Q4_K, 96, 256, 1), gguf_weight(Q.Q4_K, 48, 256, 2), gguf_weight(Q.Q6_K, 48, 256, 3)]
    qkv = fuse_rows(parts, torch.float32)
    column = ColumnParallelLinear(256, [q_block, kv_block, kv_block], group)
    column.load(qkv, None, torch.float32, auto)
    _close(column(x), _reference(qkv, auto)(x)[:, column.index])
    down = gguf_weight(Q.Q8_0, HIDDEN, INTERMEDIATE, 4)  # each rank's columns: whole blocks of 32
    row = RowParallelLinear(RowBlock(INTERMEDIATE), HIDDEN, group)
    row.load(down, None, torch.float32, auto)
    h = torch.randn(3, INTERMEDIATE)
    _close(row(h[:, row.columns.start : row.columns.stop]), _reference(down, auto)(h))
    table = gguf_weight(Q.Q8_0, VOCAB, HIDDEN, 5)  # the embedded model's tied Q8_0 table
    ids = torch.tensor([0, 49, 50, 51, 100, 7])
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, group)
    embedding.load(table, torch.float32)
    assert torch.equal(embedding(ids), F.embedding(ids, dequantize(table)))
    lm_head = ParallelLMHead(HIDDEN, VOCAB, group)
    lm_head.load(table, torch.float32, auto, embedding)
    hidden = torch.randn(4, HIDDEN)
    _close(lm_head(hidden), _reference(table, auto, lm_head=True)(hidden))


def _layers_match_unsharded(rank: int, world_size: int) -> None:
    # Sums and gathers through shared memory, then through torch.distributed (gloo), as across hosts.
    shared, plain = ParallelGroup.create(), ParallelGroup.create(use_shared_memory=False)
    assert shared.shared_memory is not None and plain.shared_memory is None
    for group in (shared, plain):
        for method in METHODS:
            torch.manual_seed(0)  # the same whole weights on every rank
            quantization = LinearQuantization(method, group_size=32, dense_matmul_min_rows=0)
            _check_attention_projections(group, quantization)
            _check_mlp(group, quantization)
            _check_vocabulary(group, quantization)
        _check_gguf_blocks(group)
        group.close()


def test_two_ranks_compute_what_one_unsharded_layer_does() -> None:
    """q/k/v (K/V heads split unevenly, and replicated), o with a bias, gate/up + down, embedding, lm_head;
    dense, int8 and int4, and over GGUF blocks."""
    spawn_ranks(_layers_match_unsharded, 2, timeout_s=180)
