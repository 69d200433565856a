"""Linears and embeddings over Q8_0 tiles: every path against the plain dequantize-then-F.linear reference."""

from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers.gguf_blocks import GGUFWeight, dequantize_blocks
from pagedllm.layers.gguf_linear import GGUFLinear
from pagedllm.layers.linear import dense_linear
from pagedllm.layers.q8_0_tiles import Q8_0Embedding, Q8_0Linear, Q8_0Tiles
from pagedllm.layers.quantization import fuse_rows
from pagedllm.layers.quantized_linears import RowStackedLinear, quantized_linear
from tests.gguf_blocks import random_blocks

Q = gguf.GGMLQuantizationType
ROWS = (1, 6, 33, 300)


def weight(qtype: Q = Q.Q8_0, out_features: int = 40, in_features: int = 512, seed: int = 0) -> GGUFWeight:
    return GGUFWeight(torch.from_numpy(random_blocks(qtype, out_features, in_features, seed)), int(qtype))


def test_a_q8_0_weight_becomes_tiles_of_its_own_bytes() -> None:
    w = weight(out_features=48)
    layer = quantized_linear(w, None, torch.bfloat16, None)
    assert isinstance(layer, Q8_0Linear) and layer.dense is None  # no dense copy unless asked for
    assert layer.tiles.numel() + layer.scales.numel() * 2 == w.blocks.numel()
    assert torch.equal(layer.weight().dequantize(), dequantize_blocks(w))
    with pytest.raises(ValueError, match="Q8_0"):
        Q8_0Tiles.from_blocks(weight(Q.Q4_K, in_features=256))


@pytest.mark.parametrize("dense_matmul_min_rows", [0, 8], ids=["tiles", "dense-copy"])
@pytest.mark.parametrize("rows", ROWS)
def test_every_path_agrees_with_the_reference(rows: int, dense_matmul_min_rows: int) -> None:
    w, bias = weight(seed=rows), torch.randn(40)
    reference = Q8_0Linear(w, bias, torch.float32, kernel="reference")
    layer = Q8_0Linear(w, bias, torch.float32, dense_matmul_min_rows=dense_matmul_min_rows)
    assert layer.kernel == "pagedllm" and (layer.dense is not None) == (dense_matmul_min_rows > 0)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    expected = reference(x)
    torch.testing.assert_close(expected, F.linear(x, dequantize_blocks(w), bias))
    ours = layer(x)
    if 0 < dense_matmul_min_rows <= rows or rows > layer.tiles_max_rows:  # a dense matmul: float rounding only
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    else:  # int8-rounded activations
        assert (ours - expected).norm() <= 2e-2 * (expected - bias).norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_row_count_gives_a_row_its_bits_alone(dtype: torch.dtype) -> None:
    """Without a dense copy every row count up to tiles_max_rows (past any verification's) takes the tiles kernel."""
    layer = Q8_0Linear(weight(seed=2), torch.randn(40), dtype)
    rows = int(layer.tiles_max_rows)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(5)).to(dtype)
    together = layer(x)
    assert together.dtype == dtype and rows >= 127
    for row in (0, 7, 8, 65, rows - 1):
        assert torch.equal(layer(x[row : row + 1]), together[row : row + 1]), row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_sized_steps_multiply_by_the_weight_dequantized_for_the_call(dtype: torch.dtype) -> None:
    w = weight(seed=4)
    layer = Q8_0Linear(w, None, dtype)
    assert torch.equal(layer.dequantized(dtype), dequantize_blocks(w).to(dtype))
    assert torch.equal(Q8_0Linear(w, None, dtype, kernel="reference").dequantized(dtype), layer.dequantized(dtype))
    x = torch.randn(int(layer.tiles_max_rows) + 1, 512, generator=torch.Generator().manual_seed(6)).to(dtype)
    assert torch.equal(layer(x), dense_linear(x, dequantize_blocks(w).to(dtype), None))
    below = x[:-1]
    assert torch.equal(layer(below), torch.ops.pagedllm.q8_0_tiles_linear(below, layer.tiles, layer.scales, 40))


def test_projections_fuse_with_a_q8_0_part_in_tiles() -> None:
    """As Gemma 3's Q4_K_M file stores q/k/v: Q5_0 q and k, Q8_0 v."""
    parts = [weight(Q.Q5_0, 32, seed=1), weight(Q.Q5_0, 16, seed=2), weight(Q.Q8_0, 16, seed=3)]
    fused = fuse_rows(parts, torch.float32)
    layer = quantized_linear(fused, None, torch.float32, 0)
    assert isinstance(layer, RowStackedLinear)
    assert [type(p) for p in layer.parts] == [GGUFLinear, GGUFLinear, Q8_0Linear]
    x = torch.randn(5, 512)
    expected = F.linear(x, torch.cat([dequantize_blocks(p) for p in parts]))
    assert (layer(x) - expected).norm() <= 2e-2 * expected.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_embedding_lookups_read_their_rows_from_the_tiles(dtype: torch.dtype) -> None:
    w = weight(out_features=50, in_features=256)  # a last tile of 2 rows
    lm_head = Q8_0Linear(w, None, dtype)
    embedding = Q8_0Embedding(lm_head.weight(), dtype)
    assert embedding.tiles.data_ptr() == lm_head.tiles.data_ptr()  # one copy
    token_ids = torch.tensor([[0, 49, 7], [7, 16, 48]])
    expected = F.embedding(token_ids, dequantize_blocks(w)).to(dtype)
    assert torch.equal(embedding(token_ids), expected)
    assert torch.equal(embedding.reference(token_ids.reshape(-1)).view_as(expected), expected)
