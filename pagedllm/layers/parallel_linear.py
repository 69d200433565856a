"""Tensor-parallel linears and embeddings: each rank of a ParallelGroup holds a slice of a layer's weight.

Column-parallel layers (fused q/k/v, gate/up) keep a slice of the output rows of each fused projection, whole
units (heads, or runs of channels) at a time, so a rank computes its own heads with no communication. The query
heads split as evenly as they go, since attention's work goes with them (9 over 2 ranks: 4 and 5), and each rank
holds every K/V head its query heads read (head_shard): a K/V head whose group of query heads the split cuts is
computed and cached on both sides of the cut, as are the K/V heads of GQA and MQA models with fewer K/V heads than
ranks. The MLP's channels split evenly (balanced_channels): every all-reduce waits for the slowest rank, so each
stretch between two sums, not a rank's whole layer, has to be even. Row-parallel layers (o, down) keep the matching
slice of input columns and sum their partial outputs with one all-reduce. The embedding and the lm_head split the
vocabulary: a lookup sums the one rank's row that holds each token, the lm_head gathers every rank's logits.

Weights arrive whole and in the form the layer stores them (LinearQuantization.prepare of the whole matrix), and
are sliced afterwards, so every rank multiplies by exactly the numbers one process would: int4 input columns along
whole groups, GGUF blocks by whole rows, or along their input only where the split falls between blocks (a split
inside a block is refused: quantization=none or int4 re-stores such a weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.group import ParallelGroup
from pagedllm.errors import ConfigError
from pagedllm.layers.attention import HeadGroups
from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.gguf_linear import GGUFEmbedding
from pagedllm.layers.linear import KERNEL_IN_MULTIPLE, Linear
from pagedllm.layers.quantization import (
    Int4Weight,
    Int8Weight,
    LinearQuantization,
    QuantizedWeight,
    RowStackedWeight,
    dequantize,
    int4_group_size,
    select_rows,
)
from pagedllm.layers.quantized_linears import quantized_linear
from pagedllm.model.lazy_weights import StoredLayout

Weight = torch.Tensor | QuantizedWeight


@dataclass(frozen=True)
class RowBlock:
    """One projection within a fused weight: `num_units` units (heads, or runs of channels) of `unit_size` rows,
    rank r holding the units spans[r] (spans may overlap: shared K/V heads), or shard_units' where spans is empty."""

    num_units: int
    unit_size: int = 1
    spans: tuple[range, ...] = ()

    @property
    def rows(self) -> int:
        return self.num_units * self.unit_size

    def units(self, rank: int, world_size: int) -> range:
        """The units rank `rank` holds."""
        return self.spans[rank] if self.spans else shard_units(self.num_units, rank, world_size)


def shard_units(num_units: int, rank: int, world_size: int) -> range:
    """The run of units rank `rank` holds: runs differ by at most one unit, the larger ones on the later ranks."""
    if num_units < world_size:
        raise ValueError(f"{num_units} heads or channels cannot be split over {world_size} ranks")
    return range(rank * num_units // world_size, (rank + 1) * num_units // world_size)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds: its run of query heads and the run of K/V heads they read."""

    queries: range
    kv_heads: range
    groups: HeadGroups  # which of the rank's K/V heads each of its query heads reads


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Rank `rank`'s query heads (shard_units) and every K/V head they read."""
    queries = shard_units(num_heads, rank, world_size)
    queries_per_kv = num_heads // num_kv_heads
    kv_heads = range(queries.start // queries_per_kv, (queries.stop - 1) // queries_per_kv + 1)
    return HeadShard(queries, kv_heads, HeadGroups(queries_per_kv, queries.start - kv_heads.start * queries_per_kv))


def attention_blocks(num_heads: int, num_kv_heads: int, head_dim: int, world_size: int) -> tuple[RowBlock, RowBlock]:
    """How q and k (or v) rows split over ranks: the query heads one at a time as evenly as they go, each rank's
    K/V heads those its query heads read (head_shard)."""
    spans = tuple(head_shard(num_heads, num_kv_heads, r, world_size).kv_heads for r in range(world_size))
    return RowBlock(num_heads, head_dim), RowBlock(num_kv_heads, head_dim, spans)


def attention_rows(num_heads: int, num_kv_heads: int, head_dim: int, world_size: int) -> list[int]:
    """Each rank's rows of q/k/v and input columns of o, which attention_blocks gives it."""
    q_block, kv_block = attention_blocks(num_heads, num_kv_heads, head_dim, world_size)
    return [
        2 * len(q_block.units(r, world_size)) * q_block.unit_size
        + 2 * len(kv_block.units(r, world_size)) * kv_block.unit_size
        for r in range(world_size)
    ]


def balanced_channels(intermediate_size: int, attention_rows: list[int], unit: int) -> RowBlock:
    """The MLP's channels in runs of `unit`, as even as whole runs allow, the extra runs of an uneven split going to
    the ranks with the fewest attention rows. Each all-reduce waits for the slowest rank, so the MLP's own work is
    what has to be even: a rank with fewer heads waits at the attention's sum whatever the MLP does. An even split
    where runs do not divide intermediate_size or there are fewer runs than ranks."""
    world_size = len(attention_rows)
    num_runs = intermediate_size // unit
    if intermediate_size % unit or num_runs < world_size:
        return RowBlock(intermediate_size)
    lightest = sorted(range(world_size), key=lambda r: (attention_rows[r], r))[: num_runs % world_size]
    split = [num_runs // world_size + (r in lightest) for r in range(world_size)]
    starts = [sum(split[:r]) for r in range(world_size)]
    return RowBlock(num_runs, unit, tuple(range(s, s + n) for s, n in zip(starts, split)))


def column_unit(layout: StoredLayout, quantization: LinearQuantization) -> int:
    """The input columns a split of a weight stored as `layout`, loaded as `quantization` loads it, must keep
    together: whole GGUF blocks or int4 groups, and runs the int kernels take (KERNEL_IN_MULTIPLE)."""
    if quantization.method != "none" and layout.block_columns > 1:
        unit = layout.block_columns
    elif quantization.method == "int4":
        unit = int4_group_size(layout.shape[1], quantization.group_size)
    else:
        unit = 1
    return math.lcm(unit, KERNEL_IN_MULTIPLE)


def shard_index(blocks: list[RowBlock], rank: int, world_size: int) -> torch.Tensor:
    """The rows (of a fused weight stacking `blocks`) that rank `rank` holds, in order."""
    pieces, start = [], 0
    for block in blocks:
        units = block.units(rank, world_size)
        first, last = start + units.start * block.unit_size, start + units.stop * block.unit_size
        pieces.append(torch.arange(first, last))
        start += block.rows
    return torch.cat(pieces)


def select_output_rows(weight: Weight, index: torch.Tensor) -> Weight:
    """Rows `index` (ascending) of a dense or quantized [out, in] weight; GGUF rows are whole rows of blocks."""
    if isinstance(weight, torch.Tensor):
        return weight[index].contiguous()
    if not isinstance(weight, RowStackedWeight):
        return select_rows(weight, index)
    parts, start = [], 0
    for part in weight.parts:
        mine = index[(index >= start) & (index < start + part.shape[0])] - start
        if len(mine):
            parts.append(select_rows(part, mine))
        start += part.shape[0]
    return parts[0] if len(parts) == 1 else RowStackedWeight(tuple(parts))


def select_input_columns(weight: Weight, columns: range) -> Weight:
    """Input columns `columns` of a dense or quantized [out, in] weight (int4: whole groups; GGUF: whole blocks)."""
    if isinstance(weight, torch.Tensor):
        return weight[:, columns.start : columns.stop].contiguous()
    if isinstance(weight, RowStackedWeight):
        return RowStackedWeight(tuple(select_input_columns(part, columns) for part in weight.parts))  # type: ignore[misc]
    if isinstance(weight, GGUFWeight):
        return _select_block_columns(weight, columns)
    q = weight.q[:, columns.start : columns.stop].contiguous()
    if isinstance(weight, Int8Weight):
        return Int8Weight(q, weight.scales)  # one scale per output row, whatever columns it spans
    group = weight.group_size
    if columns.start % group or len(columns) % group:
        raise ValueError(f"input columns {columns.start}..{columns.stop} do not cover whole int4 groups of {group}")
    groups = slice(columns.start // group, columns.stop // group)
    return Int4Weight(q, weight.scales[:, groups].contiguous(), weight.mins[:, groups].contiguous(), group)


def _select_block_columns(weight: GGUFWeight, columns: range) -> GGUFWeight:
    """The GGUF blocks of input columns `columns`; a ConfigError where they start or end inside a block."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(weight.ggml_type)]
    if columns.start % block_values or len(columns) % block_values:
        raise ConfigError(
            f"tensor parallelism splits a {weight.type_name} weight's input at columns {columns.start}..{columns.stop}"
            f", inside its blocks of {block_values} values; load it with quantization=none or int4",
            "quantization",
        )
    first, last = columns.start // block_values * block_bytes, columns.stop // block_values * block_bytes
    return GGUFWeight(weight.blocks[:, first:last].contiguous(), weight.ggml_type)


def linear_for(
    weight: Weight, bias: torch.Tensor | None, dtype: torch.dtype, dense_matmul_min_rows: int | None
) -> nn.Module:
    """A Linear over a dense weight, else the layer quantized_linear picks for the weight as it is stored."""
    if isinstance(weight, torch.Tensor):
        layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.load(weight, bias)
        return layer
    return quantized_linear(weight, bias, dtype, dense_matmul_min_rows)


class ColumnParallelLinear(nn.Module):
    """This rank's output rows of x Wᵀ + b, W stacking the projections `blocks` (e.g. q, k, v heads)."""

    def __init__(self, in_features: int, blocks: list[RowBlock], group: ParallelGroup, bias: bool = False) -> None:
        super().__init__()
        self.group = group
        self.blocks = blocks
        self.index = shard_index(blocks, group.rank, group.world_size)
        self.in_features, self.out_features = in_features, len(self.index)
        self.linear: nn.Module = Linear(in_features, self.out_features, bias)

    def local_rows(self, block: int) -> int:
        """How many output rows of projection `block` this rank holds."""
        units = self.blocks[block].units(self.group.rank, self.group.world_size)
        return len(units) * self.blocks[block].unit_size

    def load(
        self, weight: Weight, bias: torch.Tensor | None, dtype: torch.dtype, quantization: LinearQuantization
    ) -> None:
        """Take the whole fused weight (and bias) and keep this rank's rows, stored as `quantization` says."""
        expected = (sum(block.rows for block in self.blocks), self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight shape {tuple(weight.shape)} != expected {expected}")
        weight = select_output_rows(quantization.prepare(weight, dtype), self.index)
        bias = None if bias is None else bias[self.index].contiguous()
        self.linear = linear_for(weight, bias, dtype, quantization.dense_matmul_min_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear(nn.Module):
    """x Wᵀ + b from this rank's input columns (those a ColumnParallelLinear of `in_block` gave it), summed."""

    def __init__(self, in_block: RowBlock, out_features: int, group: ParallelGroup, bias: bool = False) -> None:
        super().__init__()
        if in_block.num_units < group.world_size:
            raise ValueError(
                f"{in_block.num_units} input heads or channels cannot be split over {group.world_size} ranks"
            )
        self.group = group
        units = in_block.units(group.rank, group.world_size)
        self.columns = range(units.start * in_block.unit_size, units.stop * in_block.unit_size)
        self.in_features, self.out_features = in_block.rows, out_features
        self.linear: nn.Module = Linear(len(self.columns), out_features)
        # Added once, after the sum.
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def load(
        self, weight: Weight, bias: torch.Tensor | None, dtype: torch.dtype, quantization: LinearQuantization
    ) -> None:
        """Take the whole weight (and bias) and keep this rank's input columns, stored as `quantization` says."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != expected {(self.out_features, self.in_features)}")
        weight = select_input_columns(quantization.prepare(weight, dtype), self.columns)
        self.linear = linear_for(weight, None, dtype, quantization.dense_matmul_min_rows)
        if self.bias is not None:
            if bias is None:
                raise ValueError("checkpoint lacks a bias this layer needs")
            self.bias.data = bias.to(dtype).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.linear(x))
        return y if self.bias is None else y + self.bias


def attention_projections(
    hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, group: ParallelGroup, bias: bool
) -> tuple[ColumnParallelLinear, RowParallelLinear, HeadShard]:
    """A rank's fused q/k/v projection (its query heads, then the K/V heads they read), its o_proj (those query
    heads' input columns) and its heads."""
    q_block, kv_block = attention_blocks(num_heads, num_kv_heads, head_dim, group.world_size)
    qkv = ColumnParallelLinear(hidden_size, [q_block, kv_block, kv_block], group, bias)
    heads = head_shard(num_heads, num_kv_heads, group.rank, group.world_size)
    return qkv, RowParallelLinear(q_block, hidden_size, group), heads


def vocab_range(vocab_size: int, rank: int, world_size: int) -> range:
    """The token ids rank `rank` holds (shares differ by at most one token)."""
    return range(rank * vocab_size // world_size, (rank + 1) * vocab_size // world_size)


class VocabParallelEmbedding(nn.Module):
    """Token embeddings, each rank holding the rows of its vocab_range (GGUF blocks stay blocks)."""

    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tokens = vocab_range(vocab_size, group.rank, group.world_size)
        # Left uninitialized (load fills it): a random one would draw as many numbers as this rank has tokens.
        self.lookup: nn.Module = nn.Embedding.from_pretrained(torch.empty(len(self.tokens), hidden_size))

    def load(self, table: Weight, dtype: torch.dtype) -> None:
        """Take the whole [vocab, hidden] table and keep this rank's rows."""
        if tuple(table.shape) != (self.vocab_size, self.hidden_size):
            expected = (self.vocab_size, self.hidden_size)
            raise ValueError(f"embedding shape {tuple(table.shape)} != expected {expected}")
        index = torch.arange(self.tokens.start, self.tokens.stop)
        if isinstance(table, GGUFWeight):
            self.lookup = GGUFEmbedding(select_rows(table, index), dtype)  # type: ignore[arg-type]
            return
        dense = table if isinstance(table, torch.Tensor) else dequantize(table).to(dtype)
        self.lookup.weight.data = dense[self.tokens.start : self.tokens.stop].clone()  # the whole table is let go

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return self.lookup(input_ids)
        local = input_ids - self.tokens.start
        elsewhere = (local < 0) | (local >= len(self.tokens))
        hidden = self.lookup(local.masked_fill(elsewhere, 0))
        hidden.masked_fill_(elsewhere.unsqueeze(-1), 0)
        return self.group.all_reduce(hidden)


class ParallelLMHead(nn.Module):
    """Logits over the whole vocabulary on every rank, each rank multiplying by the rows of its vocab_range; or,
    with `gather` off, each rank's own columns (its vocab_range), for a caller that joins them itself."""

    def __init__(self, hidden_size: int, vocab_size: int, group: ParallelGroup) -> None:
        super().__init__()
        self.group = group
        self.gather = True
        self.vocab_size = vocab_size
        self.tokens = vocab_range(vocab_size, group.rank, group.world_size)
        self.widths = [len(vocab_range(vocab_size, r, group.world_size)) for r in range(group.world_size)]
        self.hidden_size = hidden_size
        self.linear: nn.Module = Linear(hidden_size, len(self.tokens))

    def load(
        self,
        weight: Weight,
        dtype: torch.dtype,
        quantization: LinearQuantization,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        """Take the whole [vocab, hidden] weight (a tied embedding table, or the checkpoint's own) and keep this
        rank's rows, stored as `quantization` says for an lm_head; a dense one tied to `tied` shares its rows."""
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"lm_head shape {tuple(weight.shape)} != expected {(self.vocab_size, self.hidden_size)}")
        prepared = quantization.prepare(weight, dtype, lm_head=True)
        shared = tied is not None and tied.tokens == self.tokens and isinstance(tied.lookup, nn.Embedding)
        if isinstance(prepared, torch.Tensor) and shared:
            assert tied is not None
            self.linear = linear_for(tied.lookup.weight.data, None, dtype, quantization.dense_matmul_min_rows)
            return
        index = torch.arange(self.tokens.start, self.tokens.stop)
        self.linear = linear_for(select_output_rows(prepared, index), None, dtype, quantization.dense_matmul_min_rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        if self.group.world_size == 1 or not self.gather:
            return logits
        widest = max(self.widths)
        if logits.shape[-1] < widest:
            logits = F.pad(logits, (0, widest - logits.shape[-1]))
        gathered = self.group.all_gather(logits)
        return torch.cat([gathered[r, ..., :width] for r, width in enumerate(self.widths)], dim=-1)
