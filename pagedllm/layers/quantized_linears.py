"""The layer that multiplies each kind of quantized weight, and fused projections stored in different kinds."""

from __future__ import annotations

import gguf
import torch
from torch import nn

from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.gguf_linear import GGUFLinear
from pagedllm.layers.linear import QuantizedLinear
from pagedllm.layers.q8_0_tiles import Q8_0Linear
from pagedllm.layers.quantization import QuantizedWeight, RowStackedWeight


def quantized_linear(
    weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, dense_matmul_min_rows: int | None
) -> nn.Module:
    """A linear layer over `weight` as stored: GGUF blocks (Q8_0 rearranged into tiles), int8/int4, or fused parts
    of several kinds."""
    if isinstance(weight, GGUFWeight) and weight.ggml_type == gguf.GGMLQuantizationType.Q8_0:
        return Q8_0Linear(weight, bias, dtype, dense_matmul_min_rows)
    if isinstance(weight, GGUFWeight):
        return GGUFLinear(weight, bias, dtype, dense_matmul_min_rows)
    if isinstance(weight, RowStackedWeight):
        return RowStackedLinear(weight, bias, dtype, dense_matmul_min_rows)
    return QuantizedLinear(weight, bias, dtype, dense_matmul_min_rows)


class RowStackedLinear(nn.Module):
    """Fused projections (q/k/v, gate/up) whose weights are stored in different kinds: each part multiplies by its
    own layer, and their outputs are joined in order."""

    def __init__(
        self, weight: RowStackedWeight, bias: torch.Tensor | None, dtype: torch.dtype, dense_matmul_min_rows: int | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        sizes = [part.shape[0] for part in weight.parts]
        biases = [None] * len(sizes) if bias is None else list(bias.split(sizes))
        self.parts = nn.ModuleList(
            quantized_linear(part, part_bias, dtype, dense_matmul_min_rows)
            for part, part_bias in zip(weight.parts, biases, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)
