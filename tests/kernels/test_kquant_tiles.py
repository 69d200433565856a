"""Q4_K and Q6_K weights repacked into output tiles: their values against gguf's dequantize, their matmuls against
the plain dequantize-then-matmul reference, and a row's bits whatever the rows beside it."""

from __future__ import annotations

import gguf
import pytest
import torch

from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.gguf_blocks import GGUFWeight, dequantize_blocks
from pagedllm.layers.gguf_linear import GGUF_TILE_TYPES
from tests.gguf_blocks import random_blocks

Q = gguf.GGMLQuantizationType
ops = torch.ops.pagedllm
# Every row tile (5 .. 1 with AVX-512, 4 .. 1 with AVX2) and their mixes, more rows than a row block (60), a prefill.
ROWS = (1, 2, 3, 5, 7, 8, 9, 17, 32, 65, 300)
# 56 outputs: 7 tiles, with AVX-512 four at a time, then a pair, then one alone.
IN_FEATURES, OUT_FEATURES = 512, 56


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    assert cpu_kernels_available(), "the kernels must build on this machine: the tests below would test nothing"


def weight(qtype: Q, out_features: int = OUT_FEATURES, in_features: int = IN_FEATURES, seed: int = 0) -> GGUFWeight:
    return GGUFWeight(torch.from_numpy(random_blocks(qtype, out_features, in_features, seed)), int(qtype))


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel rounds it: int8 levels, x times 127 / max |x| per 32 inputs, nearest (ties to even)."""
    runs = x.float().reshape(x.shape[0], -1, 32)
    largest = runs.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    return (torch.round(runs * inverse) * (largest / 127)).reshape(x.shape)


@pytest.mark.parametrize("shape", [(40, 512), (8, 256), (16, 2304)], ids=str)
@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_tiles_hold_exactly_gguf_weights_in_about_the_files_bytes(qtype: Q, shape: tuple[int, int]) -> None:
    w = weight(qtype, *shape)
    tiles = ops.kquant_tiles(w.blocks, int(qtype))
    expected = torch.from_numpy(gguf.quants.dequantize(w.blocks.numpy(), qtype))
    assert torch.equal(ops.kquant_dequantize(tiles, int(qtype), torch.float32), expected)
    assert torch.equal(ops.kquant_dequantize(tiles, int(qtype), torch.bfloat16), expected.bfloat16())
    # Q4_K: its 12 bytes of packed 6-bit scales and minimums take 16 as bytes (1.03x); Q6_K: the file's bytes.
    assert tiles.numel() * 144 == w.blocks.numel() * (148 if qtype == Q.Q4_K else 144)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_tiles_multiply_int8_exact_activations_exactly(qtype: Q, rows: int) -> None:
    w = weight(qtype, seed=rows)
    x = torch.randint(-127, 128, (rows, IN_FEATURES), generator=torch.Generator().manual_seed(rows)).float()
    x[:, ::32] = 127  # every rounding run's scale is 1: the kernel's int8 activations are x itself
    dense = dequantize_blocks(w).double()
    expected = x.double() @ dense.T
    # Integers per sub-block, then a float32 sum over the sub-blocks: off by float32 steps of the terms' sizes.
    bound = 1e-6 * (x.double().abs() @ dense.abs().T)
    got = ops.kquant_linear(x, ops.kquant_tiles(w.blocks, int(qtype)), int(qtype)).double()
    assert ((got - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_tiles_match_the_reference_with_rounded_activations(qtype: Q, rows: int, dtype: torch.dtype) -> None:
    w = weight(qtype, seed=rows)
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows)).to(dtype)
    dense = dequantize_blocks(w).double()
    ours = ops.kquant_linear(x, ops.kquant_tiles(w.blocks, int(qtype)), int(qtype))
    assert ours.dtype == dtype and ours.shape == (rows, OUT_FEATURES)
    # Against the same rounding done here: only float summation order (and bfloat16's output rounding) differ.
    expected = rounded_activations(x).double() @ dense.T
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    # Against the unrounded activations: the int8 rounding's error.
    exact = x.double() @ dense.T
    assert (ours.double() - exact).norm() <= 2e-2 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_tiles_give_a_row_the_same_bits_alone_or_beside_others(qtype: Q, dtype: torch.dtype) -> None:
    # A verification's rows must each equal a lone decode of their position: every row count takes its own tile
    # (1 .. 5 rows), or tiles of the most rows then the rest (6 .. 17).
    w = weight(qtype, seed=6)
    tiles = ops.kquant_tiles(w.blocks, int(qtype))
    x = torch.randn(17, IN_FEATURES, generator=torch.Generator().manual_seed(7)).to(dtype)
    alone = torch.cat([ops.kquant_linear(x[r : r + 1], tiles, int(qtype)) for r in range(17)])
    for rows in range(1, 18):
        assert torch.equal(ops.kquant_linear(x[:rows], tiles, int(qtype)), alone[:rows]), rows


@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_tiles_keep_a_leading_shape_and_check_their_operands(qtype: Q) -> None:
    w = weight(qtype)
    tiles = ops.kquant_tiles(w.blocks, int(qtype))
    x = torch.randn(2, 3, IN_FEATURES)
    assert torch.equal(
        ops.kquant_linear(x, tiles, int(qtype)), ops.kquant_linear(x.view(6, -1), tiles, int(qtype)).view(2, 3, -1)
    )
    with pytest.raises(RuntimeError, match="features"):
        ops.kquant_linear(torch.randn(2, IN_FEATURES + 256), tiles, int(qtype))
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        ops.kquant_tiles(w.blocks, int(Q.Q5_K))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ops.kquant_tiles(w.blocks[:36], int(qtype))
