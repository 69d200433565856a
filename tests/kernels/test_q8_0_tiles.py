"""Q8_0 weights in tiles of 16 outputs: the layout against gguf's dequantize, the kernel against the reference, and a
row's outputs alone against the same row beside others."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.q8_0_tiles import Q8_0Tiles
from tests.gguf_blocks import random_blocks

Q = gguf.GGMLQuantizationType
ops = torch.ops.pagedllm
# Every row tile (8 with AVX-512, 4 with AVX2 and the scalar code) and every rest after it, and many row tiles.
ROWS = (1, 2, 3, 5, 6, 8, 9, 17, 100)
IN_FEATURES = 512
OUT_FEATURES = (48, 40)  # whole tiles, and a last tile of 8 outputs


@pytest.fixture(autouse=True, scope="module")
def kernels() -> None:
    assert cpu_kernels_available(), "the kernels must build on this machine: the tests below would test nothing"


def weight(out_features: int, seed: int = 0, full_range: bool = False) -> GGUFWeight:
    """A Q8_0 weight; `full_range`: every byte value -128 .. 127 among its c, rows of all -128 and all 127."""
    blocks = random_blocks(Q.Q8_0, out_features, IN_FEATURES, seed).reshape(out_features, -1, 34)
    if full_range:
        rng = np.random.default_rng(seed)
        blocks[..., 2:] = rng.integers(0, 256, blocks[..., 2:].shape, dtype=np.uint8)
        blocks[0, :, 2:], blocks[1, :, 2:] = 0x80, 0x7F
    return GGUFWeight(torch.from_numpy(blocks.reshape(out_features, -1)), int(Q.Q8_0))


def tiles_of(w: GGUFWeight) -> Q8_0Tiles:
    return Q8_0Tiles.from_blocks(w)


def multiply(x: torch.Tensor, tiles: Q8_0Tiles) -> torch.Tensor:
    return ops.q8_0_tiles_linear(x, tiles.tiles, tiles.scales, tiles.out_features)


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel rounds it: per block of 32, int8 levels of x * (127 / max|x|), times max|x| / 127."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, torch.full_like(largest, 127.0) / largest, torch.zeros_like(largest))
    return (torch.round(blocks * inverse) * (largest / 127)).reshape(x.shape)


@pytest.mark.parametrize("out_features", OUT_FEATURES)
def test_tiles_hold_the_blocks_weights_exactly(out_features: int) -> None:
    w = weight(out_features, full_range=True)
    tiles = tiles_of(w)
    # The file's bytes rearranged: 34 per 32 weights, a last partial tile padded to 16 outputs.
    padded = -(-out_features // 16) * 16
    assert tiles.tiles.numel() + 2 * tiles.scales.numel() == padded * IN_FEATURES // 32 * 34
    expected = torch.from_numpy(gguf.quants.dequantize(w.blocks.numpy(), Q.Q8_0))
    assert torch.equal(tiles.dequantize(), expected)
    for dtype in (torch.float32, torch.bfloat16):  # the kernel's dequantization, for prefill-sized matmuls
        dequantized = ops.q8_0_tiles_dequantize(tiles.tiles, tiles.scales, out_features, dtype)
        assert torch.equal(dequantized, expected.to(dtype))
    index = torch.tensor([0, 1, out_features - 1, 17, 17])
    assert torch.equal(tiles.rows(index), expected[index])


def test_tiles_put_a_steps_outputs_in_lanes() -> None:
    w = weight(32, full_range=True)
    tiles = tiles_of(w)
    blocks = w.blocks.view(32, -1, 34)
    c = blocks[..., 2:].contiguous().view(torch.int8).reshape(32, IN_FEATURES)
    for t, b, s, o, j in [(0, 0, 0, 0, 0), (1, 3, 5, 7, 2), (1, 15, 7, 15, 3), (0, 9, 2, 11, 1)]:
        n, k = 16 * t + o, 32 * b + 4 * s + j
        assert tiles.tiles[t, 512 * b + 64 * s + 4 * o + j].item() == c[n, k].item() + 128
        d = blocks[n, b, :2].contiguous().view(torch.float16)
        assert tiles.scales[t, 16 * b + o].item() == d.item()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_features", OUT_FEATURES)
def test_kernel_multiplies_int8_exact_activations_exactly(rows: int, out_features: int) -> None:
    w = weight(out_features, seed=rows, full_range=True)
    x = torch.randint(-127, 128, (rows, IN_FEATURES), generator=torch.Generator().manual_seed(rows)).float()
    x[:, ::32] = 127  # every block's scale is 1: the kernel's int8 activations are x itself
    x[0] = 127 * (-1) ** torch.arange(IN_FEATURES)  # the largest products of both signs, against rows of -128 and 127
    dense = tiles_of(w).dequantize().double()
    expected = x.double() @ dense.T
    # Exact integer sums per block, then a float32 sum over the blocks: off by float32 steps of the terms' sizes.
    bound = 1e-6 * (x.double().abs() @ dense.abs().T)
    assert ((multiply(x, tiles_of(w)).double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matches_the_reference_with_rounded_activations(rows: int, dtype: torch.dtype) -> None:
    w = weight(40, seed=rows)
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows)).to(dtype)
    dense = tiles_of(w).dequantize().double()
    ours = multiply(x, tiles_of(w))
    assert ours.dtype == dtype and ours.shape == (rows, 40)
    # Against the same rounding done here: only float32 summation (and bfloat16's output rounding) differ.
    expected = rounded_activations(x).double() @ dense.T
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    # Against the unrounded activations: the int8 rounding's error.
    exact = x.double() @ dense.T
    assert (ours.double() - exact).norm() <= 2e-2 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_features", OUT_FEATURES)
def test_kernel_gives_a_row_the_same_bits_alone_or_beside_others(out_features: int, dtype: torch.dtype) -> None:
    tiles = tiles_of(weight(out_features, seed=3))
    x = torch.randn(33, IN_FEATURES, generator=torch.Generator().manual_seed(4)).to(dtype)
    alone = torch.cat([multiply(x[r : r + 1], tiles) for r in range(len(x))])
    for rows in [*range(1, 18), 33]:  # every row tile and rest, one after another
        assert torch.equal(multiply(x[:rows], tiles), alone[:rows]), rows
    assert torch.equal(multiply(x[5:11].view(2, 3, -1), tiles), alone[5:11].view(2, 3, -1))  # any leading shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_features", OUT_FEATURES)
def test_looked_up_rows_are_the_references_to_the_bit(out_features: int, dtype: torch.dtype) -> None:
    tiles = tiles_of(weight(out_features, seed=5, full_range=True))
    index = torch.tensor([0, out_features - 1, 1, 17, 17, *range(out_features)])  # repeats, every channel, any order
    got = ops.q8_0_tiles_rows(tiles.tiles, tiles.scales, out_features, index, dtype)
    assert torch.equal(got, tiles.rows(index).to(dtype))
    assert ops.q8_0_tiles_rows(tiles.tiles, tiles.scales, out_features, index[:0], dtype).shape == (0, IN_FEATURES)
    with pytest.raises(RuntimeError, match="out of"):
        ops.q8_0_tiles_rows(tiles.tiles, tiles.scales, out_features, torch.tensor([3, out_features]), dtype)
    with pytest.raises(RuntimeError, match="out of"):
        ops.q8_0_tiles_rows(tiles.tiles, tiles.scales, out_features, torch.tensor([-1]), dtype)


def test_kernel_checks_its_operands() -> None:
    tiles = tiles_of(weight(40))
    x = torch.randn(2, IN_FEATURES)
    with pytest.raises(RuntimeError, match="features"):
        ops.q8_0_tiles_linear(torch.randn(2, IN_FEATURES - 32), tiles.tiles, tiles.scales, 40)
    with pytest.raises(RuntimeError, match="do not hold"):
        ops.q8_0_tiles_linear(x, tiles.tiles, tiles.scales, 49)
    with pytest.raises(RuntimeError, match="scales"):
        ops.q8_0_tiles_linear(x, tiles.tiles, tiles.scales.float(), 40)
    with pytest.raises(RuntimeError, match="whole blocks"):
        ops.q8_0_tiles_linear(x, tiles.tiles[:, :-1].contiguous(), tiles.scales, 40)
    with pytest.raises(RuntimeError, match="do not hold"):
        ops.q8_0_tiles_dequantize(tiles.tiles, tiles.scales, 49, torch.bfloat16)
    with pytest.raises(RuntimeError, match="scales"):
        ops.q8_0_tiles_dequantize(tiles.tiles, tiles.scales.float(), 40, torch.bfloat16)
