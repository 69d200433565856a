"""Linear projections, dense or weight-only quantized; fused ones hold several projections' weights stacked by rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.cpu import native_bfloat16_matmul
from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.quantization import Int4Weight, Int8Weight, QuantizedWeight, dequantize

# Both int4 kernels read w = (q - 8) * scale + zero.
INT4_KERNEL_OFFSET = 8
# The kernels store scales and zero points in bfloat16; PyTorch's also take bfloat16 activations.
KERNEL_DTYPE = torch.bfloat16
# Who multiplies a quantized weight: pagedllm's CPU kernels, PyTorch's weight-only CPU kernels, or the plain
# dequantize-then-F.linear path.
KERNELS = ("pagedllm", "torch", "reference")
# The input widths pagedllm's kernels take are whole multiples of these: both round activations in runs of 32
# channels, and int4 reads weights in chunks of 64.
KERNEL_WIDTH_MULTIPLE = {8: 32, 4: 64}
# Up to this many rows pagedllm's kernels multiply by the packed weight; more rows unpack it once for a dense
# matmul, which reuses each weight across the rows.
PACKED_MATMUL_MAX_ROWS = 64
# Where bfloat16 matmuls are native (AMX, AVX512-BF16) a dense copy beats the int kernels from this many rows.
NATIVE_BFLOAT16_DENSE_MIN_ROWS = 8


class Linear(nn.Module):
    """y = x Wᵀ + b with a frozen weight of shape [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

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


def default_kernel(device: torch.device, in_features: int, bits: int) -> str:
    """pagedllm's CPU kernels where they build (and take the width), else PyTorch's, else the reference."""
    if device.type == "cpu" and in_features % KERNEL_WIDTH_MULTIPLE[bits] == 0 and cpu_kernels_available():
        return "pagedllm"
    return "torch" if weight_only_kernels_available(device) else "reference"


def default_dense_min_rows() -> int:
    """Rows from which quantized linears multiply by a dense copy: few where bfloat16 matmuls are native; elsewhere
    the int kernels beat float32 matmuls up to their last row (measured on an AVX2 CPU: batch 8 decodes 2.9x and
    batch 32 1.3x faster on them)."""
    return NATIVE_BFLOAT16_DENSE_MIN_ROWS if native_bfloat16_matmul() else PACKED_MATMUL_MAX_ROWS + 1


def pack_int4_chunks(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 as [out, in // 2] bytes, pagedllm's int4 kernel layout: in each run of 64 weights,
    byte j holds weight j in its low nibble and weight 32 + j in its high nibble."""
    nibbles = q.to(torch.uint8).view(q.shape[0], -1, 2, 32)
    return (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def kernel_representable(weight: QuantizedWeight) -> QuantizedWeight:
    """The weight with scales (and zero points) rounded to bfloat16 as the kernels store them.

    Every path of a QuantizedLinear computes with these rounded values, so which path a step takes
    changes only activation rounding, never the weights.
    """
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.q, weight.scales.to(KERNEL_DTYPE).float())
    scales = weight.scales.to(KERNEL_DTYPE).float()
    zeros = (weight.mins + INT4_KERNEL_OFFSET * weight.scales).to(KERNEL_DTYPE).float()
    return Int4Weight(weight.q, scales, zeros - INT4_KERNEL_OFFSET * scales, weight.group_size)


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 per channel or int4 per group (weight-only quantization).

    Few rows (decode steps) go through a weight-only kernel (`kernel`, see KERNELS), which reads 1 or 0.5
    byte per weight; with `dense_min_rows` > 0 a dense copy of the dequantized weight in `dtype` is also kept,
    and inputs of at least that many rows multiply by it (a compute-bound dense matmul beats the int kernels
    there). The plain reference path dequantizes and calls F.linear.
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dense_min_rows: int = 0,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        weight = kernel_representable(weight)
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.dense_min_rows = dense_min_rows
        self.bits = 8 if isinstance(weight, Int8Weight) else 4
        self.group_size = weight.group_size if isinstance(weight, Int4Weight) else 0
        self.kernel = default_kernel(weight.q.device, self.in_features, self.bits) if kernel is None else kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
        self.register_buffer("dense", dequantize(weight).to(dtype) if dense_min_rows > 0 else None)
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
        self.register_buffer("qweight", pack_int4_chunks(weight.q))
        zeros = weight.mins + INT4_KERNEL_OFFSET * weight.scales
        self.register_buffer("scales", torch.stack([weight.scales, zeros], dim=-1).to(KERNEL_DTYPE).contiguous())

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
        if self.dense is not None and (self.kernel == "reference" or rows >= self.dense_min_rows):
            return F.linear(x, self.dense, self.bias)
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
        if rows > PACKED_MATMUL_MAX_ROWS:
            if self.bits == 8:
                weight = self.qweight.float() * self.scales.float()[:, None]
            else:
                weight = ops.int4_dequantize(self.qweight, self.scales, self.group_size)
            return F.linear(x, weight.to(x.dtype), self.bias)
        if self.bits == 8:
            y = ops.int8_linear(x, self.qweight, self.scales)
        else:
            y = ops.int4_linear(x, self.qweight, self.scales, self.group_size)
        return y if self.bias is None else y + self.bias

    @property
    def packed_max_rows(self) -> int:
        """The most rows `forward` multiplies by the packed weight with pagedllm's kernels (more take a dense matmul)."""
        if self.dense is None:
            return PACKED_MATMUL_MAX_ROWS
        return min(PACKED_MATMUL_MAX_ROWS, self.dense_min_rows - 1)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as quantized values (reference layout only)."""
        if self.kernel != "reference":
            raise RuntimeError("the kernel layout keeps no unpacked quantized values")
        if self.bits == 8:
            return Int8Weight(self.qweight, self.scales)
        return Int4Weight(self.qweight, self.scales, self.mins, self.group_size)
