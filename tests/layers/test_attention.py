"""PagedAttention: `fast` and `reference` agree, and both equal plain dense causal attention over the whole context.

Each case scatters every sequence's context over shuffled blocks of a shared pool, pre-fills the pool with the
K/V of the tokens already cached, and runs one step over a ragged batch of decodes and (chunked or fresh)
prefills. The dense reference is written here from the definition, in float64.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.layers.attention import (
    FREED_BLOCK,
    AttentionMetadata,
    HeadGroups,
    PagedAttention,
    cache_basis,
    gather_context,
)
from pagedllm.layers.kv_quant import KV_CACHE_BITS, QuantizedKVPool


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sliding_window: int | None = None,
    groups: HeadGroups | None = None,
) -> torch.Tensor:
    """q: [Q, H, D] for the last Q positions; k, v: [L, KVH, D] for all L positions. Returns [Q, H * D].

    With a sliding window w, the query at position p sees the keys at p - w + 1 .. p. Query head h reads K/V head
    (h + offset) // size of `groups` (whole groups of H / KVH heads where None).
    """
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    size, offset = (num_heads // num_kv_heads, 0) if groups is None else (groups.queries_per_kv, groups.query_offset)
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(num_queries, num_heads, head_dim, dtype=torch.float64)
    for h in range(num_heads):
        kv = (h + offset) // size
        scores = q[:, h] @ k[:, kv].T / head_dim**0.5  # [Q, L]
        for i in range(num_queries):
            position = num_keys - num_queries + i
            scores[i, position + 1 :] = float("-inf")
            if sliding_window is not None:
                scores[i, : max(0, position - sliding_window + 1)] = float("-inf")
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, kv]
    return out.reshape(num_queries, num_heads * head_dim)


@dataclass
class StepResult:
    out: torch.Tensor  # PagedAttention's output, [T, heads * head_dim]
    dense: torch.Tensor  # the dense reference, float64
    full_kv: list[tuple[torch.Tensor, torch.Tensor]]  # each sequence's whole K and V as the pools hold them
    tables: list[list[int]]
    attention: PagedAttention
    raw_dense: torch.Tensor  # the dense reference on K/V before quantization (the same as dense when unquantized)


def run_step(
    impl: str,
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seed: int,
    kv_cache_dtype: str = "auto",
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    groups: HeadGroups | None = None,
) -> StepResult:
    """seqs: (context_len after the step, new tokens this step); the same seed gives the same data to any impl.

    With a quantized cache the dense reference attends to the K/V as stored (quantized, then dequantized, then
    rotated back to the basis of k and v). With a sliding window, the blocks wholly before a sequence's first
    query's window are FREED_BLOCK in its table, as a sliding-window KV-cache group leaves them.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks belong to no one
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, at = [], 0
    for count in blocks_per_seq:
        tables.append(ids[at : at + count])
        at += count

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_pool = torch.randn(shape, generator=gen).to(dtype)  # garbage everywhere nothing was written
    v_pool = torch.randn(shape, generator=gen).to(dtype)
    qs, ks, vs, slots, fulls, dense, raw_dense = [], [], [], [], [], [], []  # per sequence
    for (ctx, new), table in zip(seqs, tables):
        k_full = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_full = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        q = torch.randn(new, num_heads, head_dim, generator=gen).to(dtype)
        for position in range(ctx):
            block, offset = table[position // block_size], position % block_size
            if position < ctx - new:  # already cached before this step
                k_pool[block, offset] = k_full[position]
                v_pool[block, offset] = v_full[position]
            else:
                slots.append(block * block_size + offset)
        qs.append(q)
        ks.append(k_full[ctx - new :])
        vs.append(v_full[ctx - new :])
        raw_dense.append(dense_causal_attention(q, k_full, v_full, sliding_window, groups))
        if kv_cache_dtype != "auto":
            k_full, v_full = (stored(x, kv_cache_dtype) for x in (k_full, v_full))
        fulls.append((k_full, v_full))
        dense.append(dense_causal_attention(q, k_full, v_full, sliding_window, groups))

    meta_tables = tables
    if sliding_window is not None:
        meta_tables = []
        for (ctx, new), table in zip(seqs, tables):
            freed = max(0, ctx - new - sliding_window + 1) // block_size
            meta_tables.append([FREED_BLOCK] * freed + table[freed:])
    meta = AttentionMetadata.build(
        slots, meta_tables, [new for _, new in seqs], [ctx for ctx, _ in seqs], block_size, torch.device("cpu")
    )
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, impl, sliding_window, groups=groups)
    if kv_cache_dtype == "auto":
        attention.bind_pools(k_pool, v_pool)
    else:
        attention.bind_pools(quantized_pool(k_pool, kv_cache_dtype), quantized_pool(v_pool, kv_cache_dtype))
    out = attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), meta)
    return StepResult(out, torch.cat(dense), fulls, tables, attention, torch.cat(raw_dense))


def stored(x: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """x [tokens, kv_heads, head_dim] as a quantized cache holds it, back in x's basis."""
    pool = quantized_pool(x.unsqueeze(1), kv_cache_dtype)
    return pool.rotate(pool.read(torch.arange(x.shape[0])).squeeze(1))


def quantized_pool(cache: torch.Tensor, kv_cache_dtype: str) -> QuantizedKVPool:
    """A quantized pool holding every entry of cache (context where it was written, garbage elsewhere)."""
    pool = QuantizedKVPool(*cache.shape, KV_CACHE_BITS[kv_cache_dtype], cache.dtype, cache.device)
    entries = cache.flatten(0, 1)
    pool.write(entries, torch.arange(entries.shape[0]))
    return pool


# (heads, kv heads, groups): MHA, GQA, MQA, then tensor-parallel ranks' shares that start or end inside a group:
# SmolLM2's 9 query heads over 3 K/V heads on 2 ranks (heads 0-3 and 4-8), and an MQA model's 4 on 2 (heads 2-3).
HEAD_LAYOUTS = [
    (4, 4, None),
    (4, 2, None),
    (4, 1, None),
    (6, 3, None),
    (8, 2, None),
    (4, 2, HeadGroups(3)),
    (5, 2, HeadGroups(3, 1)),
    (2, 1, HeadGroups(4, 2)),
]


@st.composite
def steps(draw: st.DrawFn) -> dict:
    num_heads, num_kv_heads, groups = draw(st.sampled_from(HEAD_LAYOUTS))
    seq_kinds = draw(st.lists(st.sampled_from(["decode", "fresh_prefill", "chunk", "single"]), min_size=1, max_size=5))
    seqs = []
    for kind in seq_kinds:
        if kind == "decode":
            ctx = draw(st.integers(2, 40))
            seqs.append((ctx, 1))
        elif kind == "fresh_prefill":
            ctx = draw(st.integers(2, 24))
            seqs.append((ctx, ctx))
        elif kind == "chunk":  # a prefill chunk after cached context
            ctx = draw(st.integers(3, 40))
            seqs.append((ctx, draw(st.integers(2, ctx - 1))))
        else:  # a one-token prompt: one new token, no cached context
            seqs.append((1, 1))
    if draw(st.booleans()):  # the model runner puts one-token items first
        seqs.sort(key=lambda s: s[1] != 1)
    return dict(
        seqs=seqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        groups=groups,
        head_dim=draw(st.sampled_from([4, 8, 16])),
        block_size=draw(st.sampled_from([1, 2, 3, 4, 8])),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=60, deadline=None)
@given(steps())
def test_fast_and_reference_equal_dense_attention(case: dict) -> None:
    fast = run_step("fast", **case)
    reference = run_step("reference", **case)
    dense = fast.dense
    assert torch.equal(dense, reference.dense)
    assert fast.out.shape == dense.shape
    torch.testing.assert_close(fast.out.double(), dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(reference.out.double(), dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast.out, reference.out, atol=2e-5, rtol=1e-4)
    # The new K/V landed in the pools: every context reads back whole through its block table.
    for result in (fast, reference):
        for (ctx, _), (k_full, v_full), table in zip(case["seqs"], result.full_kv, result.tables):
            assert torch.equal(gather_context(result.attention.k_pool, torch.tensor(table), ctx), k_full)
            assert torch.equal(gather_context(result.attention.v_pool, torch.tensor(table), ctx), v_full)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_mixed_batch_with_gqa(impl: str) -> None:
    # Two decodes first (as the runner orders them), then a chunk over cached context, a fresh prefill and a
    # decode placed after the prefills.
    seqs = [(17, 1), (5, 1), (12, 7), (9, 9), (6, 1)]
    result = run_step(impl, seqs, num_heads=8, num_kv_heads=2, head_dim=16, block_size=4, seed=5)
    assert result.attention.impl == impl
    torch.testing.assert_close(result.out.double(), result.dense, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(range(0, 4), range(0, 2)), (range(4, 9), range(1, 3))])
def test_a_rank_share_of_query_heads_attends_as_the_whole_layer_does(
    impl: str, dtype: torch.dtype, heads: range, kv_heads: range
) -> None:
    """SmolLM2's 9 query heads over 3 K/V heads, cut after head 3 as 2 ranks hold them: a rank's heads, over the 2
    K/V heads they read (the middle one on both ranks), attend as the same heads of the whole layer do, decodes and
    prefills (head_dim 64: the bfloat16 kernels' own widths)."""
    gen = torch.Generator().manual_seed(3)
    seqs, block_size, head_dim = [(40, 1), (17, 1), (30, 12), (21, 21)], 16, 64
    tables = [[2, 0, 5], [7, 3], [1, 4], [6, 8]]
    pools = [torch.randn(9, block_size, 3, head_dim, generator=gen).to(dtype) for _ in range(2)]
    slots = [
        t[p // block_size] * block_size + p % block_size
        for (ctx, new), t in zip(seqs, tables)
        for p in range(ctx - new, ctx)
    ]
    tokens = len(slots)
    q = torch.randn(tokens, 9, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(tokens, 3, head_dim, generator=gen).to(dtype) for _ in range(2))
    meta = AttentionMetadata.build(
        slots, tables, [n for _, n in seqs], [c for c, _ in seqs], block_size, torch.device("cpu")
    )
    whole = PagedAttention(9, 3, head_dim, impl)
    whole.bind_pools(*(pool.clone() for pool in pools))
    expected = whole(q, k, v, meta).view(tokens, 9, head_dim)[:, heads.start : heads.stop]
    groups = HeadGroups(3, heads.start - 3 * kv_heads.start)
    share = PagedAttention(len(heads), len(kv_heads), head_dim, impl, groups=groups)
    share.bind_pools(*(pool[:, :, kv_heads.start : kv_heads.stop].contiguous() for pool in pools))
    rows = slice(kv_heads.start, kv_heads.stop)
    out = share(q[:, heads.start : heads.stop], k[:, rows], v[:, rows], meta)
    assert torch.equal(out, expected.flatten(1))
    assert torch.equal(share.k_pool, whole.k_pool[:, :, rows])


def test_query_heads_must_read_exactly_the_kv_heads_given() -> None:
    with pytest.raises(ValueError, match="do not read exactly 2 K/V heads"):
        PagedAttention(5, 2, 8, groups=HeadGroups(3, 2))  # heads 2-6 of groups of 3: 3 K/V heads
    with pytest.raises(ValueError, match="do not read exactly"):
        PagedAttention(2, 1, 8, groups=HeadGroups(2, 2))  # an offset past the group


def test_metadata_counts_leading_decodes_and_masks_their_padding() -> None:
    meta = AttentionMetadata.build(
        slot_mapping=[0, 1, 2, 3],
        block_tables=[[3, 1], [2], [0, 4, 5]],
        query_lens=[1, 1, 2],
        host_seq_lens=[6, 2, 9],
        block_size=4,
        device=torch.device("cpu"),
    )
    assert meta.num_decodes == 2
    assert meta.query_starts == [0, 1, 2, 4]
    assert meta.block_tables.tolist() == [[3, 1, 0], [2, 0, 0], [0, 4, 5]]
    (group,) = meta.decode_groups
    assert (group.start, group.end) == (0, 2)
    assert group.block_tables.tolist() == [[3, 1], [2, 0]]
    visible = group.mask[:, 0, 0, :].tolist()
    assert visible == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6]


def test_decodes_of_very_different_lengths_are_attended_in_separate_groups() -> None:
    blocks = [list(range(8)), list(range(8, 14)), [14, 15], [16], [17]]
    meta = AttentionMetadata.build(
        slot_mapping=[0] * 5,
        block_tables=blocks,
        query_lens=[1] * 5,
        host_seq_lens=[32, 22, 7, 3, 2],
        block_size=4,
        device=torch.device("cpu"),
    )
    # 6 blocks is over half of 8; 2 blocks is not, so a new group starts there and takes the 1-block rows.
    assert [(g.start, g.end) for g in meta.decode_groups] == [(0, 2), (2, 5)]
    assert [g.block_tables.shape[1] for g in meta.decode_groups] == [8, 2]


def test_unknown_impl_is_rejected() -> None:
    with pytest.raises(ValueError):
        PagedAttention(4, 4, 8, impl="flash")


@settings(max_examples=40, deadline=None)
@given(steps(), st.sampled_from(["int8", "int4"]))
def test_quantized_cache_attention_equals_dense_attention_on_stored_kv(case: dict, kv_cache_dtype: str) -> None:
    fast = run_step("fast", **case, kv_cache_dtype=kv_cache_dtype)
    reference = run_step("reference", **case, kv_cache_dtype=kv_cache_dtype)
    torch.testing.assert_close(fast.out.double(), fast.dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(reference.out.double(), reference.dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast.out, reference.out, atol=2e-5, rtol=1e-4)
    # The new K/V were quantized into the pools: every context reads back as the stored values.
    for result in (fast, reference):
        for (ctx, _), (k_stored, v_stored), table in zip(case["seqs"], result.full_kv, result.tables):
            for cache, expected in ((result.attention.k_pool, k_stored), (result.attention.v_pool, v_stored)):
                torch.testing.assert_close(
                    cache_basis(cache, gather_context(cache, torch.tensor(table), ctx)), expected
                )


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_fresh_prefill_attends_to_the_stored_kv_not_its_own(impl: str, kv_cache_dtype: str) -> None:
    # A fresh prefill alone: fast could attend to the K/V it just computed; it must see them as stored instead.
    result = run_step(
        impl, [(24, 24)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=3, kv_cache_dtype=kv_cache_dtype
    )
    torch.testing.assert_close(result.out.double(), result.dense, atol=2e-5, rtol=1e-4)
    assert (result.out.double() - result.raw_dense).abs().max() > 1e-3


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_quantized_cache_decode_gives_the_bits_of_the_prefill_that_recomputes_it(
    kv_cache_dtype: str, dtype: torch.dtype
) -> None:
    # A preempted sequence's recomputation attends its last token as a prefill row; with a quantized cache that
    # row must equal the decode step's, or the K/V it yields may round into the pool differently.
    length, num_heads, num_kv_heads, head_dim, block_size = 45, 9, 3, 64, 4
    gen = torch.Generator().manual_seed(8)
    heads = (num_heads, num_kv_heads, num_kv_heads)
    q, k, v = (torch.randn(length, h, head_dim, generator=gen).to(dtype) for h in heads)
    table = list(range(-(-length // block_size)))
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, "fast")
    empty = torch.zeros(len(table), block_size, num_kv_heads, head_dim, dtype=dtype)
    attention.bind_pools(quantized_pool(empty, kv_cache_dtype), quantized_pool(empty.clone(), kv_cache_dtype))
    prefill = AttentionMetadata.build(list(range(length)), [table], [length], [length], block_size, torch.device("cpu"))
    whole = attention(q, k, v, prefill)
    decode = AttentionMetadata.build([length - 1], [table], [1], [length], block_size, torch.device("cpu"))
    last = attention(q[-1:], k[-1:], v[-1:], decode)
    assert torch.equal(last, whole[-1:])


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_fast_and_reference_agree_in_bfloat16_on_a_ragged_batch(kv_cache_dtype: str) -> None:
    seqs = [(40, 1), (33, 1), (5, 1), (20, 6), (13, 13), (1, 1)]
    outputs = {}
    for impl in ("fast", "reference"):
        result = run_step(
            impl,
            seqs,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            block_size=16,
            seed=11,
            kv_cache_dtype=kv_cache_dtype,
            dtype=torch.bfloat16,
        )
        assert result.attention.k_pool.dtype == torch.bfloat16
        torch.testing.assert_close(result.out.double(), result.dense, atol=2e-2, rtol=2e-2)
        outputs[impl] = result.out
    torch.testing.assert_close(outputs["fast"], outputs["reference"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 256])
def test_sliding_window_attention_equals_dense_windowed_attention(
    impl: str, kv_cache_dtype: str, dtype: torch.dtype, head_dim: int
) -> None:
    # Decodes and prefills within, at and past a window of 20 (blocks of 8): fresh prompts, chunks after cached
    # context, and decodes whose first blocks are freed.
    seqs = [(90, 1), (21, 1), (20, 1), (7, 1), (60, 60), (75, 30), (19, 19), (40, 3)]
    result = run_step(impl, seqs, 4, 1, head_dim, 8, 11, kv_cache_dtype, dtype, sliding_window=20)
    tolerance = 1e-5 if dtype == torch.float32 and kv_cache_dtype == "auto" else 3e-2
    torch.testing.assert_close(result.out.double(), result.dense, rtol=tolerance, atol=tolerance)
