"""Weight-only quantized matrices: int8 per output channel, int4 per group of input channels, GGUF's own blocks, and
projections of different kinds stacked by rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.config import QUANT_GROUP_SIZES
from pagedllm.errors import UnsupportedModelError
from pagedllm.layers.gguf_blocks import GGUFWeight, dequantize_blocks

INT4_LEVELS = 15


@dataclass
class Int8Weight:
    """Symmetric int8 per output channel: w ≈ q * scales[:, None]."""

    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


@dataclass
class Int4Weight:
    """Asymmetric 4-bit per group of `group_size` input channels: w ≈ q * scale + min, q in 0..15 (unpacked)."""

    q: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [out, in // group_size] float32
    mins: torch.Tensor  # [out, in // group_size] float32
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


@dataclass
class RowStackedWeight:
    """Projections fused into one layer (q/k/v, gate/up) whose weights are stored in different kinds, by rows."""

    parts: tuple[Int8Weight | Int4Weight | GGUFWeight, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]))


QuantizedWeight = Int8Weight | Int4Weight | GGUFWeight | RowStackedWeight
QUANTIZED_WEIGHTS = (Int8Weight, Int4Weight, GGUFWeight, RowStackedWeight)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Round each output row to int8 with the scale that maps its largest magnitude to 127."""
    w = weight.float()
    # A bfloat16 scale, as PyTorch's int8 kernel takes it, so it is used exactly as chosen here (rounding it
    # afterwards would move weights by up to a quarter step). Its largest weight may then land on 127.25:
    # still within half a step of 127.
    scales = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    # An all-zero row would divide by zero; any positive scale represents it exactly.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scales)


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Weight:
    """Min-max 4-bit quantization of each run of `group_size` input channels."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    mins = groups.amin(dim=2)
    scales = (groups.amax(dim=2) - mins) / INT4_LEVELS
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((groups - mins[..., None]) / scales[..., None]).clamp(0, INT4_LEVELS)
    return Int4Weight(q.to(torch.uint8).reshape(out_features, in_features), scales, mins, group_size)


def dequantize(w: QuantizedWeight) -> torch.Tensor:
    """The float32 [out, in] matrix a quantized weight stands for."""
    if isinstance(w, Int8Weight):
        return w.q.float() * w.scales[:, None]
    if isinstance(w, GGUFWeight):
        return dequantize_blocks(w)
    if isinstance(w, RowStackedWeight):
        return torch.cat([dequantize(p) for p in w.parts])
    out_features, in_features = w.q.shape
    groups = w.q.float().reshape(out_features, -1, w.group_size)
    return (groups * w.scales[..., None] + w.mins[..., None]).reshape(out_features, in_features)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights of one kind by output rows (fused q/k/v, gate/up)."""
    first = parts[0]
    if isinstance(first, Int8Weight):
        if not all(isinstance(p, Int8Weight) for p in parts):
            raise ValueError("cannot fuse int8 weights with weights of another kind")
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]))
    if isinstance(first, GGUFWeight):
        if not all(isinstance(p, GGUFWeight) and p.ggml_type == first.ggml_type for p in parts):
            raise ValueError("cannot fuse GGUF blocks of different types")
        return GGUFWeight(torch.cat([p.blocks for p in parts]), first.ggml_type)
    if not all(isinstance(p, Int4Weight) and p.group_size == first.group_size for p in parts):
        raise ValueError("cannot fuse int4 weights with weights of another kind or group size")
    return Int4Weight(
        torch.cat([p.q for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.mins for p in parts]),
        first.group_size,
    )


def select_rows(w: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    """The output rows `index` of a quantized weight (e.g. to undo a row permutation)."""
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q[index], w.scales[index])
    if isinstance(w, GGUFWeight):
        return GGUFWeight(w.blocks[index], w.ggml_type)  # each row's blocks are its own
    if isinstance(w, RowStackedWeight):
        raise ValueError("select_rows takes one projection's weight")
    return Int4Weight(w.q[index], w.scales[index], w.mins[index], w.group_size)


@dataclass(frozen=True)
class LinearQuantization:
    """How a model's linear weights are stored: the engine's quantization settings as the model needs them."""

    method: str = "none"  # none | auto (as the checkpoint stores them) | int8 | int4
    group_size: int = 128
    dense_matmul_min_rows: int | None = 0  # see QuantizedLinear

    def prepare(
        self, weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype, lm_head: bool = False
    ) -> torch.Tensor | QuantizedWeight:
        """The weight in the form a linear layer keeps under this setting (dense tensors in `dtype`).

        Under int4 the lm_head is int8: on SmolLM2 an int4 lm_head changed the top token on 7 of 14 prompts
        (int8 lm_head: 3 of 14) to save 12 MB.
        """
        if isinstance(weight, QUANTIZED_WEIGHTS):
            # A checkpoint's own quantization is kept: requantizing could only add error.
            return dequantize(weight).to(dtype) if self.method == "none" else weight
        if self.method == "int8" or (self.method == "int4" and lm_head):
            return quantize_int8(weight)
        if self.method == "int4":
            return quantize_int4(weight, int4_group_size(weight.shape[1], self.group_size))
        return weight.to(dtype)


def int4_group_size(in_features: int, requested: int) -> int:
    """The requested group size, or the largest smaller supported one that divides `in_features`."""
    for size in sorted(QUANT_GROUP_SIZES, reverse=True):
        if size <= requested and in_features % size == 0:
            return size
    raise UnsupportedModelError(f"int4 needs in_features divisible by 32; this layer has {in_features}")


def fuse_rows(parts: list[torch.Tensor | QuantizedWeight], dtype: torch.dtype) -> torch.Tensor | QuantizedWeight:
    """Stack the weights of projections fused into one layer (q/k/v, gate/up) by rows."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    kinds = {(type(p), getattr(p, "group_size", 0), getattr(p, "ggml_type", 0)) for p in parts}
    if len(kinds) == 1:
        return concat_rows(parts)  # type: ignore[arg-type]
    if not any(isinstance(p, torch.Tensor) for p in parts):
        # Mixed storage (e.g. a GGUF Q4_K_M file's Q4_K q/k and Q6_K v) stays as each part is stored.
        return RowStackedWeight(tuple(parts))  # type: ignore[arg-type]
    return torch.cat([p.to(dtype) if isinstance(p, torch.Tensor) else dequantize(p).to(dtype) for p in parts])
