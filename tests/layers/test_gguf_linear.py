"""Linears and embeddings over GGUF blocks: every path against the plain dequantize-then-F.linear reference."""

from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers.gguf_blocks import GGUF_NATIVE_TYPES, GGUFWeight, dequantize_blocks
from pagedllm.layers.gguf_linear import (
    GGUF_ANY_ROWS_TYPES,
    GGUF_DEQUANTIZED_MAX_WEIGHTS,
    GGUF_PACKED_MATMUL_MAX_ROWS,
    GGUF_TILE_TYPES,
    GGUF_TILES_DEQUANTIZED_MIN_ROWS,
    GGUFEmbedding,
    GGUFLinear,
    tiles_max_rows,
)
from pagedllm.layers.linear import dense_linear
from pagedllm.layers.quantization import LinearQuantization, RowStackedWeight, dequantize, fuse_rows
from pagedllm.layers.quantized_linears import RowStackedLinear, quantized_linear
from tests.gguf_blocks import random_blocks

Q = gguf.GGMLQuantizationType
ROWS = (1, 4, 7, 32, 300, 400)


def weight(qtype: Q, out_features: int = 24, in_features: int = 512, seed: int = 0) -> GGUFWeight:
    return GGUFWeight(torch.from_numpy(random_blocks(qtype, out_features, in_features, seed)), int(qtype))


@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_the_reference_dequantizes_exactly_as_gguf(qtype: Q) -> None:
    w = weight(qtype)
    assert w.shape == (24, 512)
    assert torch.equal(dequantize_blocks(w), torch.from_numpy(gguf.quants.dequantize(w.blocks.numpy(), qtype)))


@pytest.mark.parametrize("dense_matmul_min_rows", [0, 8], ids=["per-call-dense", "dense-copy"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_every_path_agrees_with_the_reference(qtype: Q, rows: int, dense_matmul_min_rows: int) -> None:
    w, bias = weight(qtype, seed=rows), torch.randn(24)
    reference = GGUFLinear(w, bias, torch.float32, kernel="reference")
    layer = GGUFLinear(w, bias, torch.float32, dense_matmul_min_rows=dense_matmul_min_rows)
    assert layer.kernel == "pagedllm" and (layer.dense is not None) == (dense_matmul_min_rows > 0)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    expected = reference(x)
    torch.testing.assert_close(expected, F.linear(x, dequantize_blocks(w), bias))
    ours = layer(x)
    if layer.tiles is not None:
        beyond_kernel = rows > tiles_max_rows(qtype, w.shape)
    else:
        beyond_kernel = rows > GGUF_PACKED_MATMUL_MAX_ROWS and qtype not in GGUF_ANY_ROWS_TYPES
    takes_dense = beyond_kernel or 0 < dense_matmul_min_rows <= rows
    if takes_dense:  # the same weights in a dense matmul: float rounding only
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    else:  # int8-rounded activations
        assert (ours - expected).norm() <= 2e-2 * (expected - bias).norm()


def test_bfloat16_layers_keep_the_blocks_and_answer_in_bfloat16() -> None:
    w = weight(Q.Q5_K)
    layer = GGUFLinear(w, None, torch.bfloat16)
    assert torch.equal(layer.blocks, w.blocks) and layer.dense is None and layer.tiles is None
    x = torch.randn(3, 512).bfloat16()
    y = layer(x)
    expected = F.linear(x.float(), dequantize_blocks(w))
    assert y.dtype == torch.bfloat16 and (y.float() - expected).norm() <= 2e-2 * expected.norm()


@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_unset_dense_matmul_min_rows_keeps_no_dense_copy(qtype: Q) -> None:
    """GGUF blocks take the file's bytes by default: a tied Q8_0 table such as Gemma 3's 262k-row one would more
    than double in a bfloat16 copy."""
    layer = GGUFLinear(weight(qtype), None, torch.bfloat16, dense_matmul_min_rows=None)
    assert layer.dense is None and layer.dense_matmul_min_rows == 0


def test_mixed_projections_fuse_as_they_are_stored() -> None:
    parts = [weight(Q.Q4_K, 16, seed=1), weight(Q.Q4_K, 8, seed=2), weight(Q.Q6_K, 8, seed=3)]
    fused = fuse_rows(parts, torch.float32)
    assert isinstance(fused, RowStackedWeight) and fused.shape == (32, 512)
    assert [p.ggml_type for p in fused.parts] == [Q.Q4_K, Q.Q4_K, Q.Q6_K]
    same_type = fuse_rows(parts[:2], torch.float32)
    assert isinstance(same_type, GGUFWeight) and torch.equal(
        dequantize(same_type), torch.cat([dequantize_blocks(p) for p in parts[:2]])
    )
    bias = torch.randn(32)
    layer = quantized_linear(fused, bias, torch.float32, 0)
    assert isinstance(layer, RowStackedLinear) and [type(p) for p in layer.parts] == [GGUFLinear] * 3
    x = torch.randn(5, 512)
    expected = F.linear(x, dequantize(fused), bias)
    assert (layer(x) - expected).norm() <= 2e-2 * (expected - bias).norm()
    assert LinearQuantization("auto").prepare(fused, torch.float32) is fused
    assert torch.equal(LinearQuantization("none").prepare(fused, torch.float32), dequantize(fused))


@pytest.mark.parametrize("qtype", GGUF_NATIVE_TYPES, ids=lambda q: q.name)
def test_embedding_lookups_read_their_rows_from_the_blocks(qtype: Q) -> None:
    w = weight(qtype, out_features=50, in_features=256)
    embedding = GGUFEmbedding(w, torch.bfloat16)
    token_ids = torch.tensor([[0, 49, 7], [7, 7, 3]])
    expected = F.embedding(token_ids, dequantize_blocks(w)).bfloat16()
    assert torch.equal(embedding(token_ids), expected)
    assert torch.equal(embedding.reference(w.blocks[token_ids.reshape(-1)]).view(2, 3, -1), expected)


@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_k_quant_layers_keep_tiles_of_the_same_weights_and_multiply_every_row_count_by_them(qtype: Q) -> None:
    w = weight(qtype)
    layer = GGUFLinear(w, None, torch.bfloat16)
    assert layer.blocks is None and layer.tiles is not None and "tiles" in repr(layer)
    assert torch.equal(layer.dequantized(torch.float32), dequantize_blocks(w))
    # About the file's bytes: Q4_K's packed scales take 16 bytes of 144 instead of 12, Q6_K's the same.
    assert sum(b.numel() for b in layer.buffers()) <= 1.03 * w.blocks.numel()
    for rows in (1, 300):  # a prefill's rows too (below any dequantized matmul's), so the int8 rounding shows
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
        expected = F.linear(x, dequantize_blocks(w))
        got = layer(x.bfloat16()).float()
        assert (got - expected).norm() <= 2e-2 * expected.norm()
        assert torch.equal(got, torch.ops.pagedllm.kquant_linear(x.bfloat16(), layer.tiles, int(qtype)).float())


def test_k_quant_layers_keep_the_blocks_where_tiles_cannot_take_them() -> None:
    # 36 outputs are not whole tiles of 8; a tied table's blocks also serve the embedding lookups.
    assert GGUFLinear(weight(Q.Q4_K, out_features=36), None, torch.float32).tiles is None
    table = weight(Q.Q6_K)
    tied = GGUFLinear(GGUFWeight(table.blocks, table.ggml_type, table=True), None, torch.float32)
    assert tied.tiles is None and tied.blocks.data_ptr() == table.blocks.data_ptr()
    assert GGUFLinear(table, None, torch.float32, kernel="reference").tiles is None


def test_tiles_rule_takes_the_dequantized_matmul_only_for_prefill_sized_steps_of_small_weights() -> None:
    """Q6_K and Q8_0 (640 wide, as Gemma 3's) switch well past a verification's rows; Q4_K keeps its tiles; weights
    past the dequantized copy's bound keep their tiles at every row count."""
    assert tiles_max_rows(Q.Q4_K, torch.Size((640, 2048))) == float("inf")
    for qtype in (Q.Q6_K, Q.Q8_0):
        assert tiles_max_rows(qtype, torch.Size((640, 2048))) == GGUF_TILES_DEQUANTIZED_MIN_ROWS[qtype] - 1 >= 127
        assert tiles_max_rows(qtype, torch.Size((GGUF_DEQUANTIZED_MAX_WEIGHTS // 256 + 8, 256))) == float("inf")
        assert tiles_max_rows(qtype, torch.Size((262144, 640))) == float("inf")  # Gemma 3's tied lm_head


@pytest.mark.parametrize("qtype", GGUF_TILE_TYPES, ids=lambda q: q.name)
def test_k_quant_tiles_switch_to_the_dequantized_matmul_at_the_threshold(qtype: Q) -> None:
    w = weight(qtype, out_features=16, in_features=256)
    layer = GGUFLinear(w, None, torch.bfloat16)
    limit = tiles_max_rows(qtype, w.shape)
    last_tiles_row = min(limit, 2 * max(GGUF_TILES_DEQUANTIZED_MIN_ROWS.values()))
    x = torch.randn(int(last_tiles_row) + 1, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    tiles_rows = x[: int(last_tiles_row)]
    assert torch.equal(layer(tiles_rows), torch.ops.pagedllm.kquant_linear(tiles_rows, layer.tiles, int(qtype)))
    dense = dense_linear(x, dequantize_blocks(w).bfloat16(), None)
    if limit == float("inf"):
        assert torch.equal(layer(x), torch.ops.pagedllm.kquant_linear(x, layer.tiles, int(qtype)))
    else:  # the file's weights exactly, in one dense matmul
        assert torch.equal(layer.dequantized(torch.bfloat16), dequantize_blocks(w).bfloat16())
        assert torch.equal(layer(x), dense)
    expected = F.linear(x.float(), dequantize_blocks(w))
    assert (layer(x).float() - expected).norm() <= 2e-2 * expected.norm()
