"""pagedllm's C++ CPU kernels against the plain PyTorch computations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.config import RopeScaling
from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.activation import gelu_tanh_and_mul_reference, silu_and_mul_reference
from pagedllm.layers.attention import gather_context
from pagedllm.layers.linear import kernel_representable, pack_int4_scales, pack_int4_tiles
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import Int4Weight, Int8Weight, dequantize, quantize_int4, quantize_int8
from pagedllm.layers.rotary import RotaryEmbedding

ops = torch.ops.pagedllm


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    assert cpu_kernels_available(), "the kernels must build on this machine: the tests below would test nothing"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pagedllm_int4_buffers(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    return pack_int4_tiles(weight.q), pack_int4_scales(weight.scales, weight.mins)


def int8_exact_activations(rows: int, in_features: int, seed: int) -> torch.Tensor:
    """Integers in [-127, 127] with 127 in every run of 32: the kernels' int8 rounding keeps them exactly."""
    x = torch.randint(-127, 128, (rows, in_features), generator=generator(seed)).float()
    x[:, ::32] = 127
    return x


# Groups of one run of 32 (the kernel's own code for them) and of several; 96 input features are three runs.
@pytest.mark.parametrize(
    ("in_features", "group_size"), [(96, 32), (96, 96), (256, 64), (256, 128), (1152, 32), (1152, 128), (1152, 192)]
)
# One tile of as many rows (up to 5 with AVX-512, else 4); 6 and 13: full tiles, then one of the rest.
@pytest.mark.parametrize("rows", [1, 2, 6, 13])
# 5, 6 and 7 tiles of 8 outputs: where the kernel takes output tiles four at a time, then in a pair, some are left
# to a pair or alone
@pytest.mark.parametrize("out_features", [40, 48, 56])
def test_int4_linear_rounds_only_in_float32_where_activations_are_whole_steps(
    in_features: int, group_size: int, rows: int, out_features: int
) -> None:
    weight = kernel_representable(
        quantize_int4(torch.randn(out_features, in_features, generator=generator(1)), group_size)
    )
    x = int8_exact_activations(rows, in_features, rows)
    packed, scale_min = pagedllm_int4_buffers(weight)
    expected = x.double() @ dequantize(weight).double().T
    got = ops.int4_linear(x, packed, scale_min, group_size)
    # Float32 rounding only: the sums of products reach 10^6 here.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_gives_a_row_the_same_bits_alone_or_beside_others(dtype: torch.dtype, group_size: int) -> None:
    # A verification's rows must each equal a lone decode of their position: every row count takes its own tile
    # (1 .. 8 rows), or tiles of the most rows then the rest (9 .. 17).
    weight = kernel_representable(quantize_int4(torch.randn(40, 256, generator=generator(6)), group_size))
    packed, scale_min = pagedllm_int4_buffers(weight)
    x = torch.randn(17, 256, generator=generator(7)).to(dtype)
    alone = torch.cat([ops.int4_linear(x[r : r + 1], packed, scale_min, group_size) for r in range(17)])
    expected = int8_rounded(x, group_size).double() @ dequantize(weight).double().T
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(alone.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    for rows in range(1, 18):
        assert torch.equal(ops.int4_linear(x[:rows], packed, scale_min, group_size), alone[:rows]), rows


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_with_q4_0_minimums_matches_the_reference_alone_or_beside_others(group_size: int) -> None:
    # Minimums of -8 times the scales (GGUF's Q4_0) take the kernel's offset sums: tiles 0-1 have them, tiles 2-3
    # have asymmetric minimums, tile 4 is alone; exact activations leave only float32 rounding.
    weight = kernel_representable(quantize_int4(torch.randn(40, 256, generator=generator(8)), group_size))
    mins = weight.mins.clone()
    mins[:16] = -8 * weight.scales[:16]
    weight = Int4Weight(weight.q, weight.scales, mins, group_size)
    packed, scale_min = pagedllm_int4_buffers(weight)
    x = int8_exact_activations(17, 256, 9)
    alone = torch.cat([ops.int4_linear(x[r : r + 1], packed, scale_min, group_size) for r in range(17)])
    expected = x.double() @ dequantize(weight).double().T
    torch.testing.assert_close(alone.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    for rows in (2, 8, 9, 17):
        assert torch.equal(ops.int4_linear(x[:rows], packed, scale_min, group_size), alone[:rows]), rows


def int8_rounded(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels round it: to int8 per block of channels, scaled by the block's max |x| / 127."""
    blocks = x.float().reshape(x.shape[0], -1, block)
    largest = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    return (torch.round(blocks * inverse) * (largest / 127)).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [3, 300])  # 300: a prefill's rows, rounded by several threads, in several blocks
def test_int4_linear_error_is_that_of_int8_activations(dtype: torch.dtype, group_size: int, rows: int) -> None:
    weight = kernel_representable(quantize_int4(torch.randn(64, 512, generator=generator(2)), group_size))
    x = torch.randn(rows, 512, generator=generator(3)).to(dtype)
    packed, scale_min = pagedllm_int4_buffers(weight)
    got = ops.int4_linear(x, packed, scale_min, group_size)
    assert got.dtype == dtype and got.shape == (rows, 64)
    # Activations round per weight group; the zero-point term multiplies the sums of the rounded activations too.
    expected = int8_rounded(x, group_size).double() @ dequantize(weight).double().T
    # The products are exact in int32; only the scales and the sums round, in float32 (or the output in bfloat16).
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    if dtype == torch.float32:  # the tolerance tells int8 rounding from none
        unrounded = x.double() @ dequantize(weight).double().T
        assert (got.double() - unrounded).abs().max() > 10 * tolerance * unrounded.abs().max()


# One tile of as many rows (7: a full tile and the rest without AVX-512); 64 rounded by several threads.
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64])
def test_int8_linear_rounds_only_in_float32_where_activations_are_whole_steps(rows: int) -> None:
    weight = kernel_representable(quantize_int8(torch.randn(80, 320, generator=generator(5))))
    q = weight.q.clone()
    q[:, ::7] = -128  # a file's int8 weights may use the whole range; -128 has no positive counterpart
    weight = Int8Weight(q, weight.scales)
    x = int8_exact_activations(rows, 320, 10 + rows)
    got = ops.int8_linear(x, weight.q, weight.scales.to(torch.bfloat16))
    expected = x.double() @ dequantize(weight).double().T
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def random_pools(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (
        torch.randn(shape, generator=generator(seed)).to(dtype),
        torch.randn(shape, generator=generator(seed + 1)).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
# Over 2,048 (query head, key) pairs the work is spread over threads: the first lengths stay under; the others
# go over, the long ones in several chunks of their context, as does a single sequence of 300.
@pytest.mark.parametrize(
    "lengths", [[1, 16, 17], [1, 16, 17, 150, 33, 300], [300]], ids=["one-thread", "threads", "one-long"]
)
# bfloat16 pools with head_dim a multiple of 32 take bfloat16 dot products where the CPU has them; 24 does not.
@pytest.mark.parametrize("head_dim", [32, 64, 24])
def test_paged_decode_attention_equals_sdpa_over_gathered_context(
    dtype: torch.dtype, heads: tuple[int, int], lengths: list[int], head_dim: int
) -> None:
    num_heads, kv_heads = heads
    block_size = 16
    k_pool, v_pool = random_pools(40, block_size, kv_heads, head_dim, dtype, 6)
    seq_lens = torch.tensor(lengths)
    tables = torch.stack([torch.randperm(40, generator=generator(20 + i))[:20] for i in range(len(seq_lens))])
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator(7)).to(dtype)
    got = ops.paged_decode_attention(q, k_pool, v_pool, tables, seq_lens, head_dim**-0.5)
    for row, length in enumerate(seq_lens.tolist()):
        keys, values = (gather_context(pool, tables[row], length).float() for pool in (k_pool, v_pool))
        expected = F.scaled_dot_product_attention(
            q[row].float()[:, None], keys.transpose(0, 1), values.transpose(0, 1), enable_gqa=True
        )[:, 0]
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[row].float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_decode_attention_of_a_row_is_the_same_alone_or_in_a_batch(dtype: torch.dtype, threads: int) -> None:
    """Speculative verification rows (one sequence at lengths L+1..L+k) and batch neighbours change no bit of a row."""
    block_size, num_heads, kv_heads, head_dim = 16, 9, 3, 64
    k_pool, v_pool = random_pools(64, block_size, kv_heads, head_dim, dtype, 8)
    lengths = [300, 301, 302, 303, 304, 305, 40, 700]
    tables = torch.stack([torch.randperm(64, generator=generator(30 + i))[:48] for i in range(len(lengths))])
    q = torch.randn(len(lengths), num_heads, head_dim, generator=generator(9)).to(dtype)
    seq_lens = torch.tensor(lengths)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = ops.paged_decode_attention(q, k_pool, v_pool, tables, seq_lens, head_dim**-0.5)
        for row in range(len(lengths)):
            alone = ops.paged_decode_attention(
                q[row : row + 1], k_pool, v_pool, tables[row : row + 1], seq_lens[row : row + 1], head_dim**-0.5
            )
            assert torch.equal(alone[0], batch[row]), f"row {row} (length {lengths[row]}) differs alone"
    finally:
        torch.set_num_threads(previous)


def ragged_keys(
    key_lens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """K and V of several sequences in one tensor, with a few unrelated rows before each; their starts."""
    starts, total = [], 0
    for length in key_lens:
        starts.append(total + 3)
        total += 3 + length
    k, v = (torch.randn(total, kv_heads, head_dim, generator=generator(seed + i)).to(dtype) for i in range(2))
    return k, v, starts


def dense_causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Float64 attention of the last len(q) of len(keys) positions, from the definition."""
    num_queries, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys.double().repeat_interleave(group, 1)) / head_dim**0.5
    positions = torch.arange(keys.shape[0] - num_queries, keys.shape[0])
    scores.masked_fill_(torch.arange(keys.shape[0])[None, None, :] > positions[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.double().repeat_interleave(group, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 24, 7])  # 7: an odd head dim, padded in both products
def test_prefill_attention_equals_dense_causal_attention(
    dtype: torch.dtype, heads: tuple[int, int], head_dim: int
) -> None:
    # (queries, keys): one-token prompts, fresh prompts within and across key blocks of 64 and query blocks of
    # 16, and chunks after cached context.
    shapes = [(1, 1), (5, 5), (70, 70), (1, 40), (33, 130), (16, 64), (200, 200)]
    num_heads, kv_heads = heads
    k, v, key_starts = ragged_keys([n for _, n in shapes], kv_heads, head_dim, dtype, 40)
    query_lens = [n for n, _ in shapes]
    query_starts = [sum(query_lens[:i]) for i in range(len(query_lens) + 1)]
    q = torch.randn(query_starts[-1], num_heads, head_dim, generator=generator(41)).to(dtype)
    got = ops.prefill_attention(q, k, v, query_starts, key_starts, [n for _, n in shapes], head_dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (_, num_keys) in enumerate(shapes):
        rows = slice(query_starts[i], query_starts[i + 1])
        keys = slice(key_starts[i], key_starts[i] + num_keys)
        expected = dense_causal(q[rows], k[keys], v[keys])
        torch.testing.assert_close(got[rows].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prefill_attention_of_a_chunk_equals_that_of_the_whole_prompt_exactly(dtype: torch.dtype) -> None:
    # A prompt of 150 prefilled whole, and in chunks of 37, 50 and 63: each query's output must be the same bits
    # (chunked prefill, prefix caching and preemption all depend on it).
    num_heads, kv_heads, head_dim, length = 9, 3, 64, 150
    k, v, (start,) = ragged_keys([length], kv_heads, head_dim, dtype, 50)
    q = torch.randn(length, num_heads, head_dim, generator=generator(51)).to(dtype)
    whole = ops.prefill_attention(q, k, v, [0, length], [start], [length], head_dim**-0.5)
    bounds = [0, 37, 87, length]
    chunks = [
        ops.prefill_attention(q[first:end], k, v, [0, end - first], [start], [end], head_dim**-0.5)
        for first, end in zip(bounds, bounds[1:])
    ]
    assert torch.equal(torch.cat(chunks), whole)
    # All the chunks in one call, as a step with several sequences would hold them.
    batched = ops.prefill_attention(q, k, v, bounds, [start] * 3, bounds[1:], head_dim**-0.5)
    assert torch.equal(batched, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prefill_attention_reads_heads_split_from_one_projection_as_their_copies(dtype: torch.dtype) -> None:
    # q, k and v as a layer splits them from its q/k/v projection's output: views whose tokens lie 8 heads apart.
    heads = torch.randn(100, 8, 64, generator=generator(52)).to(dtype)
    q, k, v = heads.split([4, 2, 2], dim=1)
    args = ([0, 30, 100], [0, 30], [30, 70], 64**-0.5, 0, 0, 0)
    got = ops.prefill_attention(q, k, v, *args)
    assert got.is_contiguous() and torch.equal(got, ops.prefill_attention(q.clone(), k.clone(), v.clone(), *args))
    # Keys and values whose tokens lie apart by different strides.
    assert torch.equal(ops.prefill_attention(q, k, v.clone(), *args), got)


def test_write_kv_reads_entries_split_from_one_projection_as_their_copies() -> None:
    heads = torch.randn(3, 5, 8, generator=generator(53))
    k, v = heads[:, 1:3], heads[:, 3:5]
    slots = torch.tensor([23, 0, 9])
    k_pool, v_pool = random_pools(6, 4, 2, 8, torch.float32, 54)
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    ops.write_kv_(k.clone(), v.clone(), expected_k, expected_v, slots)
    ops.write_kv_(k, v, k_pool, v_pool, slots)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)


def test_prefill_attention_and_onednn_matmuls_share_a_thread() -> None:
    """Where the kernel runs on AMX tiles it leaves each thread's tile configuration as it found it: bfloat16
    matmuls (oneDNN's, on AMX where the CPU has it) before and after it give the same bits."""
    x, w = (torch.randn(64, 576, generator=generator(seed)).bfloat16() for seed in (40, 41))
    before = x @ w.T
    k, v, starts = ragged_keys([300], 3, 64, torch.bfloat16, 42)
    q = torch.randn(300, 9, 64, generator=generator(43)).bfloat16()
    got = ops.prefill_attention(q, k, v, [0, 300], starts, [300], 0.125)
    assert torch.equal(x @ w.T, before)
    expected = dense_causal(q.float(), k[starts[0] :].float(), v[starts[0] :].float())
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


def test_prefill_attention_refuses_fewer_keys_than_queries() -> None:
    q, k = torch.randn(4, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="at least as many keys"):
        ops.prefill_attention(q, k, k, [0, 4], [0], [3], 8**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["wf32", "wbf16"])
def test_rms_norm_kernel_equals_the_reference(dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=generator(8)).to(weight_dtype)
    x = (3 * torch.randn(2, 7, 96, generator=generator(9))).to(dtype)
    got, expected = norm(x), norm.reference(x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        # The float32 normalizations may differ in their last bit, which rounding to bfloat16 hides but rarely.
        assert (got.float() - expected.float()).abs().max() <= 1e-2 * expected.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_add_rms_norm_adds_into_the_residual_then_normalizes_it(dtype: torch.dtype) -> None:
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=generator(10)).to(dtype)
    x = torch.randn(5, 96, generator=generator(11)).to(dtype)
    residual = (4 * torch.randn(5, 96, generator=generator(12))).to(dtype)
    expected_residual = residual + x
    got = ops.add_rms_norm_(residual, x, norm.weight, norm.eps)
    assert torch.equal(residual, expected_residual)
    expected = norm.reference(expected_residual)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rotate_heads_in_place_equals_the_rotary_reference_on_the_first_heads(dtype: torch.dtype) -> None:
    rotary = RotaryEmbedding(64, 512, 10000.0, RopeScaling())
    heads = torch.randn(6, 7, 64, generator=generator(13)).to(dtype)  # 4 rotated heads, then 3 left alone
    positions = torch.tensor([0, 5, 511, 17, 17, 300])
    expected = rotary.rotate(positions, heads[:, :4])
    untouched = heads[:, 4:].clone()
    ops.rotate_heads_(heads, positions, rotary.cos, rotary.sin, 4)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bfloat16: the reference rounds each product
    torch.testing.assert_close(heads[:, :4], expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(heads[:, 4:], untouched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rms_norm_rotate_heads_equals_the_qk_norms_then_rope(dtype: torch.dtype) -> None:
    rotary = RotaryEmbedding(64, 512, 10000.0, RopeScaling())
    q_norm, k_norm = RMSNorm(64, 1e-6), RMSNorm(64, 1e-6)
    q_norm.weight.data = torch.randn(64, generator=generator(38)).to(dtype)
    k_norm.weight.data = torch.randn(64, generator=generator(39)).to(dtype)
    heads = (3 * torch.randn(20, 6, 64, generator=generator(40))).to(dtype)  # 3 query, 2 key, 1 value head
    positions = torch.randint(0, 512, (20,), generator=generator(41))
    normed = torch.cat((q_norm.reference(heads[:, :3]), k_norm.reference(heads[:, 3:5])), dim=1).to(dtype)
    expected = rotary.rotate(positions, normed)
    values = heads[:, 5:].clone()
    ops.rms_norm_rotate_heads_(heads, positions, rotary.cos, rotary.sin, q_norm.weight, k_norm.weight, 1e-6, 3, 2)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bfloat16: the reference rounds each product
    torch.testing.assert_close(heads[:, :5], expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    assert torch.equal(heads[:, 5:], values)


def test_write_kv_stores_entries_at_their_slots_and_refuses_a_slot_outside_the_pool() -> None:
    k_pool, v_pool = random_pools(6, 4, 2, 8, torch.float32, 14)
    k, v = torch.randn(3, 2, 8, generator=generator(15)), torch.randn(3, 2, 8, generator=generator(16))
    slots = torch.tensor([23, 0, 9])
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    expected_k.view(-1, 2, 8).index_copy_(0, slots, k)
    expected_v.view(-1, 2, 8).index_copy_(0, slots, v)
    ops.write_kv_(k, v, k_pool, v_pool, slots)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.write_kv_(k, v, k_pool, v_pool, torch.tensor([1, 2, 24]))


@pytest.mark.parametrize("activation", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gated_activation_equals_the_reference(activation: str, dtype: torch.dtype) -> None:
    # 45: two 16-value vectors (AVX-512), one of 8 (AVX2) and a tail of 5
    gate_up = (6 * torch.randn(3, 2 * 45, generator=generator(17))).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # past the exponential's clamps
    gate_up[1, 32:36] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # the same in the 8-value part
    reference = {"silu_and_mul": silu_and_mul_reference, "gelu_tanh_and_mul": gelu_tanh_and_mul_reference}
    got, expected = getattr(ops, activation)(gate_up), reference[activation](gate_up)
    assert got.dtype == dtype and got.shape == (3, 45)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def windowed_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int) -> torch.Tensor:
    """Float64 attention of the last len(q) of len(keys) positions, each seeing its last `window` keys."""
    num_queries, num_heads, head_dim = q.shape
    group = num_heads // keys.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys.double().repeat_interleave(group, 1)) / head_dim**0.5
    positions = torch.arange(keys.shape[0] - num_queries, keys.shape[0])[None, :, None]
    key_positions = torch.arange(keys.shape[0])[None, None, :]
    scores.masked_fill_((key_positions > positions) | (key_positions <= positions - window), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values.double().repeat_interleave(group, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 256])  # 256: Gemma 3's, on the generic bfloat16 path
@pytest.mark.parametrize("window", [1, 20, 64, 100])
def test_paged_decode_attention_with_a_sliding_window(dtype: torch.dtype, head_dim: int, window: int) -> None:
    # Blocks wholly before a sequence's window are named -1 → 0 in its table, as freed ones are: never weighed.
    num_heads, kv_heads, block_size = 4, 1, 16
    k_pool, v_pool = random_pools(40, block_size, kv_heads, head_dim, dtype, 60)
    lengths = [1, 17, 90, 300, 64]
    tables = torch.stack([torch.randperm(39, generator=generator(61 + i))[:20] + 1 for i in range(len(lengths))])
    for row, length in enumerate(lengths):
        tables[row, : max(0, length - window) // block_size] = 0
    q = torch.randn(len(lengths), num_heads, head_dim, generator=generator(62)).to(dtype)
    got = ops.paged_decode_attention(q, k_pool, v_pool, tables, torch.tensor(lengths), head_dim**-0.5, window)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for row, length in enumerate(lengths):
        keys, values = (gather_context(pool, tables[row], length) for pool in (k_pool, v_pool))
        expected = windowed_reference(q[row : row + 1], keys, values, window)[0]
        torch.testing.assert_close(got[row].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("window", [1, 30, 64, 129])
def test_prefill_attention_with_a_sliding_window(dtype: torch.dtype, head_dim: int, window: int) -> None:
    shapes = [(1, 1), (70, 70), (1, 300), (33, 200), (200, 200)]
    num_heads, kv_heads = 4, 1
    k, v, key_starts = ragged_keys([n for _, n in shapes], kv_heads, head_dim, dtype, 70)
    query_lens = [n for n, _ in shapes]
    query_starts = [sum(query_lens[:i]) for i in range(len(query_lens) + 1)]
    q = torch.randn(query_starts[-1], num_heads, head_dim, generator=generator(71)).to(dtype)
    got = ops.prefill_attention(q, k, v, query_starts, key_starts, [n for _, n in shapes], head_dim**-0.5, window)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (_, num_keys) in enumerate(shapes):
        rows = slice(query_starts[i], query_starts[i + 1])
        keys = slice(key_starts[i], key_starts[i] + num_keys)
        expected = windowed_reference(q[rows], k[keys], v[keys], window)
        torch.testing.assert_close(got[rows].double(), expected, rtol=tolerance, atol=tolerance)
