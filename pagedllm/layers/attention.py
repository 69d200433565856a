"""Paged attention: K/V are written into block pools through a slot mapping and read back through block tables.

Two implementations share one metadata object and must agree: `reference` attends one sequence at a time over
K/V gathered from its blocks; `fast` batches every decode into one call, every prefill into another (on CPU), and
lets a fresh prefill attend to the K/V it just computed, without reading them back from the pools.

A layer with a sliding window of w lets the query at position p see the keys at positions p - w + 1 .. p; its
KV-cache group's block tables may hold FREED_BLOCK (read as block 0, never weighed) where no query can see them.

A pool is a tensor in the model dtype or a QuantizedKVPool (int8/int4); a quantized pool is always read back, a
fresh prefill's own K/V included, so a prefill and the decodes after it attend to the same (dequantized) numbers.

Query head h reads K/V head (h + query_offset) // queries_per_kv (HeadGroups): a layer holds whole groups of query
heads, but a tensor-parallel rank's even share of them may start or end inside a group. The CPU kernels take that
map as it is; the PyTorch paths, whose grouped attention wants whole groups, repeat each K/V head for its query
heads there.

A step whose metadata carries `attention_scores` (the h2o KV-cache policy) also adds, in the layers without a
sliding window, per sequence and cache position, the attention each key received, summed over the layer's heads and
the sequence's queries. Its rows take a scoring path written in PyTorch that forms the probabilities explicitly (in
float32): `reference` one sequence at a time, `fast` the decodes batched in groups as `_decode_in_groups` does; the
CPU kernels, which never hold the normalized probabilities, are skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.arithmetic import ceil_div
from pagedllm.config import ATTENTION_IMPLS
from pagedllm.kernels import use_cpu_kernels
from pagedllm.layers.kv_cache_groups import first_visible_block
from pagedllm.layers.kv_quant import QuantizedKVPool

# A decode group grows until it holds this many sequences or reaches one with half the group's longest context:
# each group gathers its keys to its own longest context, so padding stays under half of what is read.
MAX_DECODE_GROUP = 16

KVPool = torch.Tensor | QuantizedKVPool  # one layer's K or V pool
# A block-table entry whose block went back to the pool: out of every query's window (attention reads it as 0).
FREED_BLOCK = -1


@dataclass(frozen=True)
class HeadGroups:
    """Which K/V head each query head reads: query head h reads K/V head (h + query_offset) // queries_per_kv."""

    queries_per_kv: int
    query_offset: int = 0  # where the first query head sits in its K/V head's group

    def whole(self, num_heads: int, num_kv_heads: int) -> bool:
        """Whether the query heads form whole groups, query head h reading K/V head h // (num_heads / num_kv_heads)."""
        return self.query_offset == 0 and num_heads == self.queries_per_kv * num_kv_heads

    def kv_heads(self, num_heads: int) -> torch.Tensor:
        """The K/V head each query head reads, [num_heads]."""
        return (torch.arange(num_heads) + self.query_offset) // self.queries_per_kv


@dataclass
class DecodeGroup:
    """Consecutive decode rows attended in one call, their keys gathered to the group's longest context."""

    start: int
    end: int
    block_tables: torch.Tensor  # [rows, max_blocks_in_group]
    mask: torch.Tensor  # [rows, 1, 1, max_blocks_in_group * block_size] True where a key is visible


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit in the ragged batch and in the KV cache; built once per step."""

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] context length after this step
    query_starts: list[int]  # [num_seqs + 1] offsets of each sequence's tokens in the batch
    host_seq_lens: list[int]  # same as seq_lens, on the host
    host_num_blocks: list[int]  # each sequence's block table length (its row of block_tables before the padding)
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    block_size: int
    # Every KV-cache group's metadata, this one first; empty where the model has one group.
    kv_cache_groups: list[AttentionMetadata] = field(default_factory=list)
    # [num_seqs, max_blocks * block_size] float32 where the step reports attention: every layer adds to it.
    attention_scores: torch.Tensor | None = None

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata of a KV-cache group: its block tables and slots."""
        return self.kv_cache_groups[group] if self.kv_cache_groups else self

    @functools.cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """The decode rows in runs of similar context length, for the paths that batch them by PyTorch ops (built
        when first asked: the kernels read the block tables themselves)."""
        return [
            _decode_group(start, end, self.host_num_blocks, self.block_tables, self.seq_lens, self.block_size)
            for start, end in _decode_group_bounds(self.host_num_blocks[: self.num_decodes])
        ]

    @functools.cached_property
    def context_blocks(self) -> tuple[torch.Tensor, list[int]]:
        """Every sequence's context blocks in one flat list, and where each sequence's entries start in them."""
        counts = [ceil_div(length, self.block_size) for length in self.host_seq_lens]
        blocks = torch.cat([table[:count] for table, count in zip(self.block_tables, counts)])
        return blocks, list(accumulate((count * self.block_size for count in counts[:-1]), initial=0))

    @classmethod
    def build(
        cls,
        slot_mapping: list[int],
        block_tables: list[list[int]],
        query_lens: list[int],
        host_seq_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        query_starts = [0]
        for length in query_lens:
            query_starts.append(query_starts[-1] + length)
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device).clamp_(min=0),
            seq_lens=torch.tensor(host_seq_lens, dtype=torch.int64, device=device),
            query_starts=query_starts,
            host_seq_lens=list(host_seq_lens),
            host_num_blocks=[len(t) for t in block_tables],
            num_decodes=num_decodes,
            block_size=block_size,
        )


def _decode_group_bounds(num_blocks: list[int]) -> list[tuple[int, int]]:
    """Split decode rows (best sorted longest first) into runs of similar context length."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for row in range(1, len(num_blocks) + 1):
        if (
            row == len(num_blocks)
            or row - start == MAX_DECODE_GROUP
            or 2 * num_blocks[row] < max(num_blocks[start:row])
        ):
            bounds.append((start, row))
            start = row
    return bounds


def _decode_group(
    start: int, end: int, num_blocks: list[int], padded: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> DecodeGroup:
    blocks = max(num_blocks[start:end])
    positions = torch.arange(blocks * block_size, device=padded.device)
    mask = (positions[None, :] < seq_lens[start:end, None])[:, None, None, :]
    return DecodeGroup(start, end, padded[start:end, :blocks], mask)


class PagedAttention(nn.Module):
    """Attention over a paged KV cache for one layer; the pools are bound once the cache is allocated."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        impl: str = "fast",
        sliding_window: int | None = None,
        scale: float | None = None,
        groups: HeadGroups | None = None,
    ) -> None:
        """`groups` None: whole groups of num_heads / num_kv_heads query heads."""
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.groups = groups or HeadGroups(num_heads // num_kv_heads)
        last_kv_head = (num_heads - 1 + self.groups.query_offset) // self.groups.queries_per_kv
        if not 0 <= self.groups.query_offset < self.groups.queries_per_kv or last_kv_head != num_kv_heads - 1:
            raise ValueError(f"{num_heads} query heads in {self.groups} do not read exactly {num_kv_heads} K/V heads")
        # The K/V head each query head reads where the PyTorch paths must repeat them, else None.
        self.kv_head_index = None if self.groups.whole(num_heads, num_kv_heads) else self.groups.kv_heads(num_heads)
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.impl = impl
        self.sliding_window = sliding_window
        self.kv_cache_group = 0
        self.k_pool = torch.empty(0)
        self.v_pool = torch.empty(0)

    def bind_pools(self, k_pool: KVPool, v_pool: KVPool, kv_cache_group: int = 0) -> None:
        """Attach this layer's pools, each [num_blocks, block_size, num_kv_heads, head_dim], and its KV-cache group."""
        self.k_pool, self.v_pool = k_pool, v_pool
        self.kv_cache_group = kv_cache_group

    @property
    def window_arg(self) -> int:
        """The kernels' sliding-window argument: 0 for none."""
        return self.sliding_window or 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] for the new tokens. Returns [T, heads * head_dim]."""
        meta = meta.for_group(self.kv_cache_group)
        write_kv(self.k_pool, self.v_pool, k, v, meta.slot_mapping)
        # A rotated pool holds K H and V H: q H . k H = q . k, and the output comes back as (attention . v) H.
        q = cache_basis(self.k_pool, q)
        # Scores are positions within the cache: only the layers that see the whole of it report them.
        if meta.attention_scores is not None and self.sliding_window is None:
            out = self._attend_and_score(q, k, v, meta, meta.attention_scores)
        elif self.impl == "fast" and use_cpu_kernels(q):
            out = self._attend_with_cpu_kernels(q, k, v, meta)
        else:
            out = self._attend_by_parts(q, k, v, meta)
        return cache_basis(self.v_pool, out).flatten(1)

    def _attend_with_cpu_kernels(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Decodes in one kernel call that reads the pools in place, every other row in one prefill kernel call.

        Over a quantized pool, decodes take the prefill call too: a preempted sequence's recomputation then gives
        each of its K/V entries the numbers its decode step gave it, before they are rounded into the pool again.
        """
        if isinstance(self.k_pool, QuantizedKVPool):
            blocks, key_starts = meta.context_blocks
            keys, values = (read_blocks(cache, blocks).flatten(0, 1) for cache in (self.k_pool, self.v_pool))
            return self._prefill_batch(q, keys, values, meta.query_starts, key_starts, meta.host_seq_lens)
        first_prefill, num_seqs = meta.num_decodes, len(meta.host_seq_lens)
        if first_prefill == num_seqs:
            return self._decode_in_place(q, meta)
        context = [self._prefill_context(i, k, v, meta, attend_new=True) for i in range(first_prefill, num_seqs)]
        key_lens = [keys.shape[0] for keys, _ in context]
        key_starts = list(accumulate(key_lens[:-1], initial=0))
        keys, values = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*context))
        start = meta.query_starts[first_prefill]
        prefills = self._prefill_batch(q[start:], keys, values, meta.query_starts[first_prefill:], key_starts, key_lens)
        if start == 0:
            return prefills
        return torch.cat([self._decode_in_place(q[:start], meta), prefills])

    def _attend_by_parts(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """`fast` off CPU: decodes in groups, then each prefill on its own; `reference`: each sequence on its own."""
        # A fresh prefill may skip reading back its own K/V only where the pool stores them unrounded.
        attend_new = self.impl == "fast" and not isinstance(self.k_pool, QuantizedKVPool)
        out = torch.empty_like(q)
        first_prefill = 0
        if self.impl == "fast" and meta.num_decodes:
            first_prefill = meta.num_decodes
            out[:first_prefill] = self._decode_in_groups(q[:first_prefill], meta)
        for i in range(first_prefill, len(meta.host_seq_lens)):
            start, end = meta.query_starts[i], meta.query_starts[i + 1]
            keys, values = self._prefill_context(i, k, v, meta, attend_new)
            out[start:end] = self._attend_one(q[start:end], keys, values)
        return out

    def _attend_and_score(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scores: torch.Tensor
    ) -> torch.Tensor:
        """Attention that adds what each key received to `scores`: `fast` batches the decodes in groups,
        `reference` (and `fast` for prefills) attends each sequence on its own."""
        attend_new = self.impl == "fast" and not isinstance(self.k_pool, QuantizedKVPool)
        out = torch.empty_like(q)
        first_prefill = 0
        if self.impl == "fast" and meta.num_decodes:
            first_prefill = meta.num_decodes
            for group in meta.decode_groups:
                keys, values = (
                    self._kv_for_queries(read_blocks(pool, group.block_tables).flatten(1, 2).transpose(1, 2), 1)
                    for pool in (self.k_pool, self.v_pool)
                )
                rows = slice(group.start, group.end)
                output, received = scored_attention(q[rows].unsqueeze(2), keys, values, group.mask, self.scale)
                out[rows] = output.squeeze(2)
                scores[rows, : received.shape[1]] += received
        for i in range(first_prefill, len(meta.host_seq_lens)):
            start, end = meta.query_starts[i], meta.query_starts[i + 1]
            keys, values = (self._kv_for_queries(x, 1) for x in self._prefill_context(i, k, v, meta, attend_new))
            num_keys = keys.shape[0]
            mask = torch.ones(end - start, num_keys, dtype=torch.bool, device=q.device).tril(num_keys - (end - start))
            output, received = scored_attention(
                q[start:end].transpose(0, 1).unsqueeze(0),
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),
                mask,
                self.scale,
            )
            out[start:end] = output.squeeze(0).transpose(0, 1)
            scores[i, :num_keys] += received[0]
        return out

    def _prefill_context(
        self, i: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, attend_new: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's keys and values for its prefill: the new ones themselves where they are its whole context.

        With a sliding window, read from the first block its first query can see (attention is shift-invariant).
        """
        start, end = meta.query_starts[i], meta.query_starts[i + 1]
        if attend_new and meta.host_seq_lens[i] == end - start:
            return k[start:end], v[start:end]
        first_block = 0
        if self.sliding_window is not None:
            first_query = meta.host_seq_lens[i] - (end - start)
            first_block = first_visible_block(first_query, self.sliding_window, meta.block_size)
        table, length = meta.block_tables[i][first_block:], meta.host_seq_lens[i] - first_block * meta.block_size
        return gather_context(self.k_pool, table, length), gather_context(self.v_pool, table, length)

    def _prefill_batch(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        query_starts: list[int],
        key_starts: list[int],
        key_lens: list[int],
    ) -> torch.Tensor:
        """Causal attention of ragged queries in one kernel call: sequence i's queries start at query_starts[i]
        (less query_starts[0]) and are the last positions of its key_lens[i] keys, which start at key_starts[i]."""
        offset = query_starts[0]
        return torch.ops.pagedllm.prefill_attention(
            q,
            keys,
            values,
            [s - offset for s in query_starts],
            key_starts,
            key_lens,
            self.scale,
            self.window_arg,
            self.groups.queries_per_kv,
            self.groups.query_offset,
        )

    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last len(q) positions of one sequence over its len(k) keys."""
        num_queries, num_keys = q.shape[0], k.shape[0]
        k, v = self._kv_for_queries(k, 1), self._kv_for_queries(v, 1)
        # 4-D [1, heads, tokens, head_dim]: with 3-D inputs PyTorch's CPU attention takes the slow math path.
        q_, k_, v_ = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if num_queries == num_keys and (self.sliding_window is None or num_keys <= self.sliding_window):
            out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            query_pos = torch.arange(num_keys - num_queries, num_keys, device=q.device)[:, None]
            key_pos = torch.arange(num_keys, device=q.device)[None, :]
            mask = key_pos <= query_pos
            if self.sliding_window is not None:
                mask &= key_pos > query_pos - self.sliding_window
            out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    def _kv_for_queries(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """K or V with heads along `dim`, as grouped attention takes them: each head repeated for its query heads
        where they are not whole groups."""
        if self.kv_head_index is None:
            return x
        return x.index_select(dim, self.kv_head_index.to(x.device))

    def _decode_in_place(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query token per sequence, in one CPU kernel call that reads the (unquantized) pools in place."""
        rows = q.shape[0]
        return torch.ops.pagedllm.paged_decode_attention(
            q,
            self.k_pool,
            self.v_pool,
            meta.block_tables[:rows],
            meta.seq_lens[:rows],
            self.scale,
            self.window_arg,
            self.groups.queries_per_kv,
            self.groups.query_offset,
        )

    def _decode_in_groups(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query token per sequence, each group of similar lengths in one call over its gathered keys."""
        out = torch.empty_like(q)
        for group in meta.decode_groups:
            keys, values = (
                self._kv_for_queries(read_blocks(pool, group.block_tables).flatten(1, 2).transpose(1, 2), 1)
                for pool in (self.k_pool, self.v_pool)
            )
            mask = group.mask
            if self.sliding_window is not None:
                positions = torch.arange(mask.shape[-1], device=q.device)
                first_visible = meta.seq_lens[group.start : group.end] - self.sliding_window
                mask = mask & (positions[None, :] >= first_visible[:, None])[:, None, None, :]
            out[group.start : group.end] = F.scaled_dot_product_attention(
                q[group.start : group.end].unsqueeze(2),
                keys,
                values,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            ).squeeze(2)
        return out


def scored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its probabilities formed explicitly: q [B, heads, Q, D], k and v [B, kv_heads, L, D], mask
    broadcast to [B, heads, Q, L] (True where a key is visible). Returns the output [B, heads, Q, D] and the
    probability each key received, summed over heads and queries, [B, L] float32."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # Query head h reads K/V head h // group: a K/V head's queries are stacked as rows, and K/V are never copied.
    group = num_heads // num_kv_heads
    rows = q.float().reshape(batch, num_kv_heads, group * num_queries, head_dim)
    logits = torch.matmul(rows, k.float().transpose(-1, -2)) * scale
    visible = mask.reshape(*mask.shape[:-2], 1, *mask.shape[-2:]).expand(*mask.shape[:-2], group, *mask.shape[-2:])
    probs = logits.masked_fill(~visible.flatten(-3, -2), float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs, v.float()).view(batch, num_heads, num_queries, head_dim)
    return out.to(q.dtype), probs.sum(dim=(1, 2))


def write_kv(k_pool: KVPool, v_pool: KVPool, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new tokens' K/V at their flat slots (block * block_size + offset)."""
    if not isinstance(k_pool, QuantizedKVPool) and use_cpu_kernels(k):
        torch.ops.pagedllm.write_kv_(k, v, k_pool, v_pool, slots)
        return
    for cache, x in ((k_pool, k), (v_pool, v)):
        if isinstance(cache, QuantizedKVPool):
            cache.write(x, slots)
        else:
            cache.view(-1, *x.shape[1:]).index_copy_(0, slots, x)


def cache_basis(cache: KVPool, x: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] in the basis the pool stores entries in (a quantized pool may rotate them); its own inverse."""
    return cache.rotate(x) if isinstance(cache, QuantizedKVPool) else x


def read_blocks(cache: KVPool, block_ids: torch.Tensor) -> torch.Tensor:
    """The entries of the given blocks in the model dtype, [*block_ids.shape, block_size, kv_heads, head_dim]."""
    return cache.read(block_ids) if isinstance(cache, QuantizedKVPool) else cache[block_ids]


def gather_context(cache: KVPool, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len tokens' entries of one sequence, [context_len, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = ceil_div(context_len, block_size)
    return read_blocks(cache, block_table[:num_blocks]).flatten(0, 1)[:context_len]


def copy_blocks(cache: KVPool, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks src[i] -> dst[i] (copy-on-write), quantization parameters included."""
    if isinstance(cache, QuantizedKVPool):
        cache.copy_blocks(src, dst)
    else:
        cache[dst] = cache[src]
