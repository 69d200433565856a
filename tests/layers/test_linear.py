"""QuantizedLinear: pagedllm's and PyTorch's int8/int4 CPU kernels agree with the plain dequantize-then-matmul path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from pagedllm.cpu import bfloat16_matrix_units, native_bfloat16_matmul
from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.linear import (
    INT8_PACKED_MATMUL_MAX_ROWS,
    MATRIX_UNITS_DENSE_MIN_ROWS,
    NATIVE_BFLOAT16_INT8_DENSE_MIN_ROWS,
    ONEDNN_FINE_ROWS,
    ONEDNN_ROW_STEP,
    ONEDNN_SIZES_PER_OCTAVE,
    QuantizedLinear,
    default_kernel,
    dense_linear,
    kernel_representable,
    matrix_units_layout,
    onednn_rows,
    weight_only_kernels_available,
)
from pagedllm.layers.quantization import QuantizedWeight, dequantize, quantize_int4, quantize_int8

IN_FEATURES, OUT_FEATURES = 256, 96


def make_weight(kind: str) -> QuantizedWeight:
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(0))
    if kind == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, int(kind.split("-g")[1]))


def inputs(rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(rows)).to(dtype)


def test_the_cpu_kernels_are_available_here() -> None:
    # The agreement tests below would compare the reference path with itself otherwise.
    assert cpu_kernels_available() and weight_only_kernels_available(torch.device("cpu"))
    cpu = torch.device("cpu")
    assert default_kernel(cpu, torch.Size([OUT_FEATURES, IN_FEATURES]), 4) == "pagedllm"
    # Shapes the kernels do not take go to PyTorch's: both need inputs in whole runs of 32, int4 outputs in whole
    # tiles of 8.
    assert default_kernel(cpu, torch.Size([12, 48]), 8) == "torch"
    assert default_kernel(cpu, torch.Size([12, 96]), 8) == "pagedllm"
    assert default_kernel(cpu, torch.Size([12, 96]), 4) == "torch"
    assert default_kernel(cpu, torch.Size([16, 96]), 4) == "pagedllm"


@pytest.mark.parametrize("kernel", ["pagedllm", "torch"])
@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 8, INT8_PACKED_MATMUL_MAX_ROWS + 1])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_kernel_path_matches_reference_path(
    kernel: str, kind: str, dtype: torch.dtype, rows: int, with_bias: bool
) -> None:
    weight = make_weight(kind)
    bias = torch.randn(OUT_FEATURES) if with_bias else None
    fast = QuantizedLinear(weight, bias, dtype, dense_matmul_min_rows=0, kernel=kernel)
    reference = QuantizedLinear(weight, bias, dtype, dense_matmul_min_rows=0, kernel="reference")
    x = inputs(rows, dtype)
    got, expected = fast(x), reference(x)
    assert got.dtype == expected.dtype == dtype and got.shape == (rows, OUT_FEATURES)
    # PyTorch's kernels take bfloat16 activations and return bfloat16: about 3 significant digits. pagedllm's
    # round activations to int8 (per run of 32, or per int4 group), as coarse as bfloat16 (tests/kernels check them
    # exactly against int8-rounded activations), except that past INT8_PACKED_MATMUL_MAX_ROWS rows the int8 one
    # multiplies the unpacked weight in float32.
    # Two such results, each rounded to bfloat16 on output, differ by up to about two bfloat16 steps.
    dense_float32 = (
        kernel == "pagedllm" and kind == "int8" and dtype == torch.float32 and rows > INT8_PACKED_MATMUL_MAX_ROWS
    )
    tolerance = 1e-5 if dense_float32 else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


@pytest.mark.parametrize("kind", ["int8", "int4-g64"])
def test_reference_path_is_f_linear_on_the_dequantized_weight(kind: str) -> None:
    weight = make_weight(kind)
    bias = torch.randn(OUT_FEATURES)
    layer = QuantizedLinear(weight, bias, torch.float32, kernel="reference")
    x = inputs(3, torch.float32)
    expected = F.linear(x, dequantize(kernel_representable(weight)), bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    moved = (dequantize(kernel_representable(weight)) - dequantize(weight)).abs().max()
    if kind == "int8":
        # quantize_int8 picks bfloat16 scales already.
        assert moved == 0
    else:
        # Rounding int4 scales and minimums to float16, as the kernel stores them, moves weights by far less
        # than a step.
        assert 0 < moved <= weight.scales.max() / 64


def test_kernel_path_keeps_the_leading_dimensions() -> None:
    layer = QuantizedLinear(make_weight("int4-g32"), None, torch.float32)
    x = torch.randn(2, 3, IN_FEATURES)
    torch.testing.assert_close(layer(x), layer(x.reshape(6, IN_FEATURES)).reshape(2, 3, OUT_FEATURES))


@pytest.mark.parametrize("kind", ["int8", "int4-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_dense_copy_serves_inputs_from_the_threshold_up(kind: str, dtype: torch.dtype) -> None:
    weight = make_weight(kind)
    bias = torch.randn(OUT_FEATURES)
    layer = QuantizedLinear(weight, bias, dtype, dense_matmul_min_rows=4)
    kernel_only = QuantizedLinear(weight, bias, dtype, dense_matmul_min_rows=0)
    reference = QuantizedLinear(weight, bias, dtype, kernel="reference")
    assert layer.dense is not None and layer.dense.dtype == dtype and kernel_only.dense is None
    assert layer.dense.is_mkldnn == (dtype == torch.bfloat16 and bfloat16_matrix_units())
    for rows in (1, 3):
        x = inputs(rows, dtype)
        assert torch.equal(layer(x), kernel_only(x)), rows
    for rows in (4, 9):
        x = inputs(rows, dtype)
        # The dense copy (in oneDNN's layout where bfloat16 matmuls run on AMX) gives the plain matmul's bits.
        assert torch.equal(layer(x), F.linear(x, dequantize(kernel_representable(weight)).to(dtype), layer.bias)), rows
        # The dense copy holds the quantized weights, not the original ones.
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_default_keeps_a_dense_copy_only_where_it_beats_the_kernels() -> None:
    int4 = QuantizedLinear(make_weight("int4-g32"), None, torch.float32, dense_matmul_min_rows=None)
    int8 = QuantizedLinear(make_weight("int8"), None, torch.float32, dense_matmul_min_rows=None)
    if bfloat16_matrix_units():
        assert int4.dense_matmul_min_rows == int8.dense_matmul_min_rows == MATRIX_UNITS_DENSE_MIN_ROWS
        assert int4.packed_max_rows == int8.packed_max_rows == MATRIX_UNITS_DENSE_MIN_ROWS - 1
    else:
        # Without bfloat16 matrix units the int4 kernel takes every row count; the int8 one its first 15 rows
        # where bfloat16 matmuls are native, else its first 64.
        int8_rows = NATIVE_BFLOAT16_INT8_DENSE_MIN_ROWS - 1 if native_bfloat16_matmul() else INT8_PACKED_MATMUL_MAX_ROWS
        assert int4.dense is None and int4.packed_max_rows == math.inf
        assert int8.dense is not None and int8.packed_max_rows == int8_rows


def test_dense_copy_costs_memory_only_when_asked_for() -> None:
    weight = make_weight("int4-g32")

    def nbytes(layer: QuantizedLinear) -> int:
        return sum(t.numel() * t.element_size() for t in layer.state_dict().values())

    without = nbytes(QuantizedLinear(weight, None, torch.float32, dense_matmul_min_rows=0))
    with_copy = nbytes(QuantizedLinear(weight, None, torch.float32, dense_matmul_min_rows=8))
    # 4 bits per weight plus a float16 scale and minimum per group of 32.
    assert without == OUT_FEATURES * IN_FEATURES // 2 + OUT_FEATURES * IN_FEATURES // 32 * 2 * 2
    assert with_copy == without + OUT_FEATURES * IN_FEATURES * 4


@given(st.integers(min_value=1, max_value=1 << 16))
def test_onednn_rows_pad_little_and_only_up(rows: int) -> None:
    padded = onednn_rows(rows)
    assert padded >= rows and onednn_rows(padded) == padded
    if rows < ONEDNN_ROW_STEP:
        assert padded == rows
    elif rows <= ONEDNN_FINE_ROWS:
        assert padded - rows < ONEDNN_ROW_STEP
    else:
        assert padded - rows < rows / ONEDNN_SIZES_PER_OCTAVE


def test_onednn_rows_take_a_few_sizes_per_doubling() -> None:
    # What bounds the matmuls oneDNN builds and keeps for a server's steps of every size.
    sizes = {onednn_rows(rows) for rows in range(1, 4097)}
    doublings = int(math.log2(4096 / ONEDNN_FINE_ROWS))
    assert len(sizes) == ONEDNN_ROW_STEP - 1 + ONEDNN_FINE_ROWS // ONEDNN_ROW_STEP + doublings * ONEDNN_SIZES_PER_OCTAVE


@pytest.mark.parametrize("layout", ["plain", "matrix_units"])
@pytest.mark.parametrize("rows", [5, 9, 63, 65, 333, 1000])
def test_padded_rows_give_the_unpadded_matmuls_bits(layout: str, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator).to(torch.bfloat16)
    bias = torch.randn(OUT_FEATURES, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, IN_FEATURES, generator=generator).to(torch.bfloat16)
    stored = matrix_units_layout(weight) if layout == "matrix_units" else weight
    got = dense_linear(x.view(1, rows, IN_FEATURES), stored, bias)
    assert got.shape == (1, rows, OUT_FEATURES) and got.is_contiguous()
    assert torch.equal(got[0], F.linear(x, weight, bias))
