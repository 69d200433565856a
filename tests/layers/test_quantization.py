"""Int8/int4 weight formats: round-trip error bounds, fusing, row selection and the per-layer storage policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.errors import UnsupportedModelError
from pagedllm.layers.quantization import (
    Int4Weight,
    Int8Weight,
    LinearQuantization,
    RowStackedWeight,
    concat_rows,
    dequantize,
    fuse_rows,
    int4_group_size,
    quantize_int4,
    quantize_int8,
    select_rows,
)

# Float32 rounding of q * scale (+ min) on weights of magnitude up to ~10.
EPS = 1e-5


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, as real layers have, so a shared scale would show.
    row_scale = torch.rand(out_features, 1, generator=generator) * 3
    return torch.randn(out_features, in_features, generator=generator) * row_scale


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 48), in_features=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_int8_round_trip_error_is_at_most_half_a_step_per_channel(
    out_features: int, in_features: int, seed: int
) -> None:
    weight = random_weight(out_features, in_features, seed)
    quantized = quantize_int8(weight)
    assert quantized.q.dtype == torch.int8 and quantized.q.shape == weight.shape
    assert quantized.scales.shape == (out_features,) and quantized.scales.dtype == torch.float32
    assert quantized.q.abs().max() <= 127
    error = (dequantize(quantized) - weight).abs()
    assert (error <= quantized.scales[:, None] / 2 + EPS).all()
    # The scale is as fine as the row allows: its largest weight lands on ±127.
    assert (quantized.q.abs().amax(dim=1) == 127).all()


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 40),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 64, 128, 256]),
    seed=st.integers(0, 2**16),
)
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(
    out_features: int, groups: int, group_size: int, seed: int
) -> None:
    weight = random_weight(out_features, groups * group_size, seed)
    quantized = quantize_int4(weight, group_size)
    assert quantized.q.dtype == torch.uint8 and quantized.q.shape == weight.shape
    assert quantized.scales.shape == quantized.mins.shape == (out_features, groups)
    assert quantized.q.max() <= 15 and quantized.group_size == group_size
    error = (dequantize(quantized) - weight).abs().reshape(out_features, groups, group_size)
    assert (error <= quantized.scales[..., None] / 2 + EPS).all()
    # Min-max: each group's smallest and largest weights are represented by levels 0 and 15.
    levels = quantized.q.reshape(out_features, groups, group_size)
    assert (levels.amin(dim=2) == 0).all() and (levels.amax(dim=2) == 15).all()


def test_zero_rows_and_constant_groups_survive_exactly() -> None:
    weight = torch.zeros(3, 64)
    assert torch.equal(dequantize(quantize_int8(weight)), weight)
    weight[1] = 0.5  # a group's min carries a constant group exactly
    assert torch.equal(dequantize(quantize_int4(weight, 32)), weight)


def test_int4_rejects_a_group_size_that_does_not_divide_the_row() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 48), 32)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_concat_rows_is_quantizing_the_concatenation(kind: str) -> None:
    parts = [random_weight(rows, 64, seed) for seed, rows in enumerate([8, 4, 4])]
    quantize = quantize_int8 if kind == "int8" else lambda w: quantize_int4(w, 32)
    fused = concat_rows([quantize(p) for p in parts])
    whole = quantize(torch.cat(parts))
    assert type(fused) is type(whole)
    assert torch.equal(dequantize(fused), dequantize(whole))


def test_concat_rows_refuses_mixed_kinds_and_group_sizes() -> None:
    weight = random_weight(4, 64, 0)
    with pytest.raises(ValueError, match="int8"):
        concat_rows([quantize_int8(weight), quantize_int4(weight, 32)])
    with pytest.raises(ValueError, match="group size"):
        concat_rows([quantize_int4(weight, 32), quantize_int4(weight, 64)])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_select_rows_permutes_every_part_of_the_weight(kind: str) -> None:
    weight = random_weight(12, 64, 3)
    quantized = quantize_int8(weight) if kind == "int8" else quantize_int4(weight, 32)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dequantize(select_rows(quantized, order)), dequantize(quantized)[order])


def test_fuse_rows_keeps_one_kind_quantized_stacks_a_mix_and_falls_back_to_dense_beside_a_dense_part() -> None:
    q, k = random_weight(8, 64, 0), random_weight(4, 64, 1)
    same = fuse_rows([quantize_int4(q, 32), quantize_int4(k, 32)], torch.float32)
    assert isinstance(same, Int4Weight)
    mixed = fuse_rows([quantize_int4(q, 32), quantize_int8(k)], torch.bfloat16)
    assert isinstance(mixed, RowStackedWeight) and [type(p) for p in mixed.parts] == [Int4Weight, Int8Weight]
    assert mixed.shape == (12, 64)
    expected = torch.cat([dequantize(quantize_int4(q, 32)), dequantize(quantize_int8(k))])
    assert torch.equal(dequantize(mixed), expected)
    with_dense = fuse_rows([quantize_int4(q, 32), k.bfloat16()], torch.bfloat16)
    assert isinstance(with_dense, torch.Tensor) and with_dense.dtype == torch.bfloat16
    assert torch.equal(with_dense, torch.cat([dequantize(quantize_int4(q, 32)), k]).bfloat16())
    assert torch.equal(fuse_rows([q, k], torch.float32), torch.cat([q, k]))


def test_int4_group_size_falls_back_to_the_largest_that_divides() -> None:
    assert int4_group_size(1536, 128) == 128
    assert int4_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert int4_group_size(576, 32) == 32
    with pytest.raises(UnsupportedModelError, match="divisible by 32"):
        int4_group_size(48, 128)


def test_storage_policy_per_method() -> None:
    weight = random_weight(16, 576, 0)
    stored = quantize_int4(weight, 32)
    assert LinearQuantization("none").prepare(weight, torch.bfloat16).dtype == torch.bfloat16
    # A checkpoint's own quantization is dequantized only when none is asked for.
    assert torch.equal(LinearQuantization("none").prepare(stored, torch.float32), dequantize(stored))
    for method in ("auto", "int8", "int4"):
        assert LinearQuantization(method).prepare(stored, torch.float32) is stored
    assert torch.equal(LinearQuantization("auto").prepare(weight, torch.float32), weight)
    assert isinstance(LinearQuantization("int8").prepare(weight, torch.float32), Int8Weight)
    int4 = LinearQuantization("int4", group_size=128).prepare(weight, torch.float32)
    assert isinstance(int4, Int4Weight) and int4.group_size == 64
    # The lm_head stays int8 under int4 (int4 there cost greedy agreement for little memory).
    assert isinstance(LinearQuantization("int4").prepare(weight, torch.float32, lm_head=True), Int8Weight)
