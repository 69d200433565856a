"""The GGUF-block kernels: their decoding against gguf's dequantize, their matmuls against the reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.gguf_blocks import GGUF_NATIVE_TYPES, GGUFWeight, dequantize_blocks
from tests.gguf_blocks import random_blocks
from tests.peak_memory import peak_resident_growth

Q = gguf.GGMLQuantizationType
ops = torch.ops.pagedllm
# Every row tile (8, 4, 2, 1 with AVX-512; 4, 2, 1 with AVX2) and their mixes, and more rows than a row block (64).
ROWS = (1, 2, 3, 5, 8, 9, 17, 32, 300)
IN_FEATURES, OUT_FEATURES = 512, 40


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    assert cpu_kernels_available(), "the kernels must build on this machine: the tests below would test nothing"


def weight(qtype: Q, seed: int = 0) -> GGUFWeight:
    return GGUFWeight(torch.from_numpy(random_blocks(qtype, OUT_FEATURES, IN_FEATURES, seed)), int(qtype))


def rounded_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels round it: int8 levels, one scale (max |x| / 127) per run of `block` values."""
    runs = x.float().reshape(x.shape[0], -1, block)
    scales = runs.abs().amax(dim=-1, keepdim=True) / 127
    levels = torch.round(runs / torch.where(scales > 0, scales, torch.ones_like(scales)))
    return (levels * scales).reshape(x.shape)


@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_kernel_decodes_blocks_exactly_as_gguf(qtype: Q) -> None:
    w = weight(qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(w.blocks.numpy(), qtype))
    assert torch.equal(ops.gguf_dequantize(w.blocks, int(qtype), torch.float32), expected)
    assert torch.equal(ops.gguf_dequantize(w.blocks, int(qtype), torch.bfloat16), expected.bfloat16())
    assert torch.equal(dequantize_blocks(w), expected)  # the PyTorch reference too


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_kernel_multiplies_int8_exact_activations_exactly(qtype: Q, rows: int) -> None:
    w = weight(qtype, seed=rows)
    x = torch.randint(-127, 128, (rows, IN_FEATURES), generator=torch.Generator().manual_seed(rows)).float()
    x[:, ::32] = 127  # every rounding block's scale is 1: the kernel's int8 activations are x itself
    dense = dequantize_blocks(w).double()
    expected = x.double() @ dense.T
    # Integer sums per block, then a float32 sum over the blocks: off by float32 steps of the terms' sizes.
    bound = 1e-6 * (x.double().abs() @ dense.abs().T)
    assert ((ops.gguf_linear(x, w.blocks, int(qtype)).double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_kernel_matches_the_reference_with_rounded_activations(qtype: Q, rows: int, dtype: torch.dtype) -> None:
    w = weight(qtype, seed=rows)
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows)).to(dtype)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    dense = dequantize_blocks(w).double()
    ours = ops.gguf_linear(x, w.blocks, int(qtype))
    assert ours.dtype == dtype and ours.shape == (rows, OUT_FEATURES)
    # Against the same rounding done here: only float summation order (and bfloat16's output rounding) differ.
    expected = rounded_activations(x, block).double() @ dense.T
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    # Against the unrounded activations: the int8 rounding's error.
    exact = x.double() @ dense.T
    assert (ours.double() - exact).norm() <= 2e-2 * exact.norm()


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0], ids=lambda q: q.name)
def test_kernel_multiplies_an_odd_number_of_blocks_of_32(qtype: Q, rows: int) -> None:
    # 3 blocks: with AVX-512 a pair, then one block alone.
    w = GGUFWeight(torch.from_numpy(random_blocks(qtype, OUT_FEATURES, 96, seed=rows)), int(qtype))
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    expected = rounded_activations(x, 32).double() @ dequantize_blocks(w).double().T
    ours = ops.gguf_linear(x, w.blocks, int(qtype)).double()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_kernel_multiplies_rows_longer_than_a_pass(qtype: Q, rows: int) -> None:
    # The kernel meets 2,048 input channels at a time: a whole pass, then the rest (for blocks of 32, 7 blocks: a
    # group of 4, a pair or 2 and 1 alone).
    in_features = 2304 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 2272
    w = GGUFWeight(torch.from_numpy(random_blocks(qtype, OUT_FEATURES, in_features, seed=rows)), int(qtype))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    expected = rounded_activations(x, block).double() @ dequantize_blocks(w).double().T
    ours = ops.gguf_linear(x, w.blocks, int(qtype)).double()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [q for q in GGUF_NATIVE_TYPES if q not in (Q.Q4_0, Q.Q4_1)], ids=lambda q: q.name)
def test_kernel_gives_a_row_the_same_bits_alone_or_beside_others(qtype: Q, dtype: torch.dtype) -> None:
    # Rows longer than two passes: one row and several sum a row's passes in the same order. (Q4_0/Q4_1 blocks,
    # kept only for tied tables, sum a tile of 4 rows in another order than one row.)
    in_features = 4608 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 4160
    w = GGUFWeight(torch.from_numpy(random_blocks(qtype, OUT_FEATURES, in_features, seed=3)), int(qtype))
    x = torch.randn(7, in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    alone = torch.cat([ops.gguf_linear(x[m : m + 1], w.blocks, int(qtype)) for m in range(7)])
    for rows in range(2, 8):
        assert torch.equal(ops.gguf_linear(x[:rows], w.blocks, int(qtype)), alone[:rows])


@pytest.mark.parametrize("out_features", [40, 36], ids=["int4-tiles", "blocks"])
@pytest.mark.parametrize("rows", [7, 8, 64])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_q4_blocks_at_any_row_count(qtype: Q, rows: int, out_features: int) -> None:
    # From 8 rows, whole tiles of 8 outputs are rewritten for the int4 kernel; 36 outputs stay on the blocks.
    w = GGUFWeight(torch.from_numpy(random_blocks(qtype, out_features, IN_FEATURES, seed=rows)), int(qtype))
    x = torch.randint(-127, 128, (rows, IN_FEATURES), generator=torch.Generator().manual_seed(rows)).float()
    x[:, ::32] = 127  # int8-exact activations: the same integer sums on both paths
    dense = dequantize_blocks(w).double()
    expected = x.double() @ dense.T
    bound = 1e-6 * (x.double().abs() @ dense.abs().T)
    assert ((ops.gguf_linear(x, w.blocks, int(qtype)).double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
def test_kernel_checks_its_operands(qtype: Q) -> None:
    w = weight(qtype)
    with pytest.raises(RuntimeError, match="features"):
        ops.gguf_linear(torch.randn(2, IN_FEATURES + 256), w.blocks, int(qtype))
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        ops.gguf_linear(torch.randn(2, IN_FEATURES), w.blocks, int(Q.Q5_1))


def test_random_blocks_are_what_they_say() -> None:
    blocks = random_blocks(Q.Q4_K, 3, 512)
    assert blocks.shape == (3, 2 * 144) and blocks.dtype == np.uint8
    values = gguf.quants.dequantize(blocks, Q.Q4_K)
    assert np.isfinite(values).all() and 0 < np.abs(values).max() < 1


def random_q4_0_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """[rows, row bytes] of random Q4_0 blocks: any nibbles, float16 scales of about 0.02 / 8."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 32, 18), dtype=np.uint8)
    blocks[..., 0:2] = (rng.uniform(0.5, 2.0, (rows, cols // 32)) * 0.0025).astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4_lm_head_is_rewritten_in_slices_of_outputs() -> None:
    # A tied Q4_0 lm_head (SmolLM2's vocabulary, a 1B model's width): its int4 tiles would take 60 MiB, more than
    # the kernel's kept buffer, so it goes in slices of outputs. Every column matches the weight cut in parts whose
    # tiles fit whole (up to float32 summation order: the int4 kernel sums a pair of tiles in another order than
    # a tile alone, and which tiles pair depends on where its parallel tasks begin), and the call's peak resident
    # memory stays well below the whole weight's tiles.
    in_features, out_features, part = 2048, 49152, 6144
    blocks = torch.from_numpy(random_q4_0_blocks(out_features, in_features, seed=5))
    x = torch.randn(8, in_features, generator=torch.Generator().manual_seed(5))
    parts = [ops.gguf_linear(x, blocks[p : p + part], int(Q.Q4_0)) for p in range(0, out_features, part)]
    whole, growth = peak_resident_growth(lambda: ops.gguf_linear(x, blocks, int(Q.Q4_0)))
    expected = torch.cat(parts, dim=1)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    whole_tiles_bytes = out_features * in_features // 2 + out_features * in_features // 32 * 4
    assert growth < whole_tiles_bytes // 2
