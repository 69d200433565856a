"""Linear projections, dense or weight-only quantized; fused ones hold several projections' weights stacked by rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.arithmetic import ceil_div
from pagedllm.cpu import bfloat16_matrix_units, native_bfloat16_matmul
from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.quantization import Int4Weight, Int8Weight, QuantizedWeight, dequantize

# PyTorch's int4 kernel reads w = (q - 8) * scale + zero.
INT4_KERNEL_OFFSET = 8
# PyTorch's kernels, and pagedllm's int8 one, take scales (and zero points) in bfloat16; PyTorch's also take
# bfloat16 activations.
KERNEL_DTYPE = torch.bfloat16
# pagedllm's int4 kernel takes scales and minimums in float16, as GGUF's Q4 blocks store them, so that their weights
# stay exact (bfloat16 has 3 fewer mantissa bits).
INT4_SCALE_DTYPE = torch.float16
# Who multiplies a quantized weight: pagedllm's CPU kernels, PyTorch's weight-only CPU kernels, or the plain
# dequantize-then-F.linear path.
KERNELS = ("pagedllm", "torch", "reference")
# Both of pagedllm's kernels round activations in runs of 32 input channels, and the int4 one interleaves output
# rows in tiles of 8: the widths they take are whole multiples of these.
KERNEL_IN_MULTIPLE = 32
INT4_TILE = 8
# Up to this many rows pagedllm's int8 kernel multiplies by the packed weight; more rows unpack it once for a dense
# matmul, which reuses each weight across the rows. The int4 kernel, tiled over outputs and rows, beats a float32
# dense matmul at every row count (docs/performance.md has the crossovers these thresholds come from).
INT8_PACKED_MATMUL_MAX_ROWS = 64
# Where bfloat16 matmuls run on matrix units (AMX) a dense copy beats the int kernels from this many rows. On vector
# units alone (AVX512-BF16) the int4 kernel's VNNI dot products keep up with oneDNN's bfloat16 matmul at every row
# count, so int4 layers keep no dense copy there.
MATRIX_UNITS_DENSE_MIN_ROWS = 8
# There the int8 kernel, whose activations take a float step per 32 channels, falls behind the bfloat16 matmul from
# this many rows.
NATIVE_BFLOAT16_INT8_DENSE_MIN_ROWS = 16
# The rows oneDNN lays a weight out for (any row count multiplies by it, with the same bits as the plain weight).
MATRIX_UNITS_LAYOUT_ROWS = 64
# oneDNN builds a matmul for each shape it meets and keeps up to 1,024 of them, so a server's steps of ever new
# sizes would grow its memory by hundreds of MiB. Its bfloat16 inputs are padded to whole multiples of
# ONEDNN_ROW_STEP rows up to ONEDNN_FINE_ROWS, then to one of ONEDNN_SIZES_PER_OCTAVE sizes per doubling (at most
# 1/8 more rows; 63 shapes up to 4,096 rows). Padding keeps the bits: each row's products do not depend on the others.
ONEDNN_ROW_STEP = 8
ONEDNN_FINE_ROWS = 64
ONEDNN_SIZES_PER_OCTAVE = 8


class Linear(nn.Module):
    """y = x Wᵀ + b with a frozen weight of shape [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take a checkpoint weight (and bias), checking its shape."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != expected {tuple(self.weight.shape)}")
        self.weight.data = weight.contiguous()
        if self.bias is not None:
            if bias is None:
                raise ValueError("checkpoint lacks a bias this layer needs")
            self.bias.data = bias.contiguous()


def weight_only_kernels_available(device: torch.device) -> bool:
    """Whether PyTorch's int8/int4 weight-only CPU matmuls can run on `device`."""
    kernels = ("_weight_int8pack_mm", "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return device.type == "cpu" and all(hasattr(torch, name) for name in kernels)


def default_kernel(device: torch.device, shape: torch.Size, bits: int) -> str:
    """pagedllm's CPU kernels where they build (and take the [out, in] shape), else PyTorch's, else the reference."""
    out_features, in_features = shape
    fits = in_features % KERNEL_IN_MULTIPLE == 0 and (bits == 8 or out_features % INT4_TILE == 0)
    if device.type == "cpu" and fits and cpu_kernels_available():
        return "pagedllm"
    return "torch" if weight_only_kernels_available(device) else "reference"


def default_dense_matmul_min_rows(bits: int) -> int:
    """Rows from which quantized linears multiply by a dense copy: few where bfloat16 matmuls run on matrix units;
    elsewhere none for int4, and for int8 a few more where bfloat16 matmuls are native, else past the rows its
    kernel takes."""
    if bfloat16_matrix_units():
        return MATRIX_UNITS_DENSE_MIN_ROWS
    if bits == 4:
        return 0
    return NATIVE_BFLOAT16_INT8_DENSE_MIN_ROWS if native_bfloat16_matmul() else INT8_PACKED_MATMUL_MAX_ROWS + 1


def matrix_units_layout(weight: torch.Tensor) -> torch.Tensor:
    """A bfloat16 CPU weight [out, in] in oneDNN's own blocked layout where its matmuls run on matrix units (AMX),
    else the weight itself. oneDNN otherwise reorders a plain weight on every call: at 64 rows the blocked one
    multiplies 1.6-2x faster (the lm_head's 49152 x 576: 5.0 -> 2.5 ms), for the same bits."""
    usable = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
    if usable and bfloat16_matrix_units():
        return torch.ops.mkldnn._reorder_linear_weight(weight, MATRIX_UNITS_LAYOUT_ROWS)
    return weight


def onednn_rows(rows: int) -> int:
    """The row count, of a few per doubling, that a matmul of `rows` rows is padded to for oneDNN (see
    ONEDNN_SIZES_PER_OCTAVE); fewer rows than ONEDNN_ROW_STEP stay as they are."""
    if rows < ONEDNN_ROW_STEP:
        return rows
    step = ONEDNN_ROW_STEP
    if rows > ONEDNN_FINE_ROWS:
        octave_start = 1 << ((rows - 1).bit_length() - 1)  # rows lie in (octave_start, 2 octave_start]
        step = octave_start // ONEDNN_SIZES_PER_OCTAVE
    return ceil_div(rows, step) * step


def dense_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The rows a dense matmul of x by weight runs on: x's, padded to onednn_rows where oneDNN multiplies them."""
    rows = x.shape[:-1].numel()
    on_onednn = weight.is_mkldnn or (x.device.type == "cpu" and x.dtype == torch.bfloat16 and native_bfloat16_matmul())
    return onednn_rows(rows) if on_onednn else rows


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b for a weight plain or in matrix_units_layout, on dense_rows rows."""
    rows, padded_rows = x.shape[:-1].numel(), dense_rows(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    if padded_rows != rows:
        flat = F.pad(flat, (0, 0, 0, padded_rows - rows))
    if weight.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    else:
        y = F.linear(flat, weight, bias)
    return y[:rows].view(*x.shape[:-1], y.shape[-1])


def pack_int4_tiles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 as [out // 8, in * 4] bytes, pagedllm's int4 kernel layout: per tile t of 8 output
    rows and step s of 8 input channels, byte 4 o + j holds weight (8 t + o, 8 s + j) in its low nibble and
    (8 t + o, 8 s + 4 + j) in its high nibble."""
    out_features, in_features = q.shape
    nibbles = q.to(torch.uint8).view(out_features // INT4_TILE, INT4_TILE, in_features // 8, 2, 4)
    nibbles = nibbles.permute(0, 2, 1, 4, 3)  # tile, step, output, j, which half of the step
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).reshape(out_features // INT4_TILE, in_features * 4).contiguous()


def pack_int4_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """[out, groups] scales and minimums as [out // 8, groups, 2, 8] float16: per tile of 8 output rows and group,
    the 8 outputs' scales, then their 8 minimums."""
    out_features, groups = scales.shape
    pairs = torch.stack([scales, mins], dim=-1).view(out_features // INT4_TILE, INT4_TILE, groups, 2)
    return pairs.permute(0, 2, 3, 1).to(INT4_SCALE_DTYPE).contiguous()


def kernel_representable(weight: QuantizedWeight, kernel: str = "pagedllm") -> QuantizedWeight:
    """The weight with scales (and minimums or zero points) rounded as `kernel` stores them: int8 scales in
    bfloat16; int4 scales and minimums in float16, or, for PyTorch's kernel, scales and zero points in bfloat16.

    Every path of a QuantizedLinear computes with these rounded values, so which path a step takes
    changes only activation rounding, never the weights.
    """
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.q, weight.scales.to(KERNEL_DTYPE).float())
    if kernel != "torch":
        scales, mins = weight.scales.to(INT4_SCALE_DTYPE).float(), weight.mins.to(INT4_SCALE_DTYPE).float()
        return Int4Weight(weight.q, scales, mins, weight.group_size)
    scales = weight.scales.to(KERNEL_DTYPE).float()
    zeros = (weight.mins + INT4_KERNEL_OFFSET * weight.scales).to(KERNEL_DTYPE).float()
    return Int4Weight(weight.q, scales, zeros - INT4_KERNEL_OFFSET * scales, weight.group_size)


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 per channel or int4 per group (weight-only quantization).

    Inputs go through a weight-only kernel (`kernel`, see KERNELS), which reads 1 or 0.5 byte per weight; with
    `dense_matmul_min_rows` > 0 a dense copy of the dequantized weight in `dtype` is also kept (in matrix_units_layout),
    and inputs of at least that many rows multiply by it (where a compute-bound dense matmul beats the int kernels);
    None takes default_dense_matmul_min_rows. The plain reference path dequantizes and calls F.linear.
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dense_matmul_min_rows: int | None = 0,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.bits = 8 if isinstance(weight, Int8Weight) else 4
        self.dense_matmul_min_rows = (
            default_dense_matmul_min_rows(self.bits) if dense_matmul_min_rows is None else dense_matmul_min_rows
        )
        self.group_size = weight.group_size if isinstance(weight, Int4Weight) else 0
        self.kernel = default_kernel(weight.q.device, weight.shape, self.bits) if kernel is None else kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        weight = kernel_representable(weight, self.kernel)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
        dense = matrix_units_layout(dequantize(weight).to(dtype)) if self.dense_matmul_min_rows > 0 else None
        self.register_buffer("dense", dense)
        if self.kernel == "pagedllm":
            self._register_pagedllm_buffers(weight)
        elif self.kernel == "torch":
            self._register_torch_buffers(weight)
        else:
            self._register_reference_buffers(weight)

    def _register_reference_buffers(self, weight: QuantizedWeight) -> None:
        self.register_buffer("qweight", weight.q)
        self.register_buffer("scales", weight.scales)
        if isinstance(weight, Int4Weight):
            self.register_buffer("mins", weight.mins)

    def _register_pagedllm_buffers(self, weight: QuantizedWeight) -> None:
        if isinstance(weight, Int8Weight):
            self._register_torch_buffers(weight)  # both kernels read int8 weights the same way
            return
        self.register_buffer("qweight", pack_int4_tiles(weight.q))
        self.register_buffer("scales", pack_int4_scales(weight.scales, weight.mins))

    def _register_torch_buffers(self, weight: QuantizedWeight) -> None:
        if isinstance(weight, Int8Weight):
            self.register_buffer("qweight", weight.q.contiguous())
            self.register_buffer("scales", weight.scales.to(KERNEL_DTYPE))
            return
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1))
        zeros = weight.mins + INT4_KERNEL_OFFSET * weight.scales
        # The kernel wants [in // group_size, out, 2]: per group, each output channel's (scale, zero).
        scales_and_zeros = torch.stack([weight.scales, zeros], dim=-1).transpose(0, 1)
        self.register_buffer("scales", scales_and_zeros.to(KERNEL_DTYPE).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.dense is not None and (self.kernel == "reference" or rows >= self.dense_matmul_min_rows):
            return dense_linear(x, self.dense, self.bias)
        if self.kernel == "reference":
            return F.linear(x, dequantize(self.quantized_weight()).to(x.dtype), self.bias)
        if self.kernel == "pagedllm":
            return self._pagedllm_forward(x, rows)
        flat = x.reshape(rows, self.in_features).to(KERNEL_DTYPE)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _pagedllm_forward(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        ops = torch.ops.pagedllm
        if self.bits == 4:
            y = ops.int4_linear(x, self.qweight, self.scales, self.group_size)
        elif rows > INT8_PACKED_MATMUL_MAX_ROWS:
            weight = self.qweight.float() * self.scales.float()[:, None]
            return dense_linear(x, weight.to(x.dtype), self.bias)
        else:
            y = ops.int8_linear(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias

    @property
    def packed_max_rows(self) -> float:
        """The most rows `forward` multiplies by the packed weight with pagedllm's kernels (more: a dense matmul)."""
        kernel_max_rows = math.inf if self.bits == 4 else INT8_PACKED_MATMUL_MAX_ROWS
        return kernel_max_rows if self.dense is None else min(kernel_max_rows, self.dense_matmul_min_rows - 1)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as quantized values (reference layout only)."""
        if self.kernel != "reference":
            raise RuntimeError("the kernel layout keeps no unpacked quantized values")
        if self.bits == 8:
            return Int8Weight(self.qweight, self.scales)
        return Int4Weight(self.qweight, self.scales, self.mins, self.group_size)
