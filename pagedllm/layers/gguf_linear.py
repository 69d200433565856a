"""Linears and embeddings whose weights stay in GGUF's own blocks (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q8_0)."""

from __future__ import annotations

import math

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.kernels import cpu_kernels_available, use_cpu_kernels
from pagedllm.layers.gguf_blocks import GGUFWeight, dequantize_blocks
from pagedllm.layers.linear import dense_linear, matrix_units_layout

# Who multiplies: pagedllm's CPU kernel (int8-rounded activations) or the plain dequantize-then-F.linear path.
GGUF_KERNELS = ("pagedllm", "reference")
# Up to this many rows the kernel multiplies by the blocks (each block's bits unpacked in registers and met by a
# few activation rows at once); more rows dequantize the weight for one dense matmul, whose blocked tiles reuse each
# weight across many more rows (docs/performance.md has the crossover).
GGUF_PACKED_MATMUL_MAX_ROWS = 32
# Types the kernel multiplies at any row count: from a few rows on it rewrites them for the call into the int4
# kernel's tiles (the same values), which beat a dense matmul up to prefill sizes.
GGUF_ANY_ROWS_TYPES = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
# Types the kernel keeps as tiles whose vector lanes are outputs, repacked once from the blocks at load (the same
# weights in about the same bytes: kquant_tiles.cpp), and multiplies so up to tiles_max_rows rows.
GGUF_TILE_TYPES = (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)
GGUF_TILE_OUTPUTS = 8  # outputs per tile: other output counts keep the blocks
# Rows from which a layer kept as tiles (GGUF_TILE_TYPES here, Q8_0 in q8_0_tiles.py) multiplies by its weight
# dequantized for the call, where a dense bfloat16 matmul beats the tiles kernel at prefill sizes (docs/performance.md);
# types absent here take their tiles at every row count. Invariant: below these rows the tiles give a row the same
# bits alone or beside others, so they must stay above every step whose rows must match one-row decodes: a speculative
# verification's at most max(disable_by_batch_size, num_speculative_tokens + 1) <= 65 rows (SpeculativeConfig's
# bounds, with disable_by_batch_size set, as by default).
GGUF_TILES_DEQUANTIZED_MIN_ROWS = {gguf.GGMLQuantizationType.Q6_K: 384, gguf.GGMLQuantizationType.Q8_0: 128}
# Tiles of more weights than this keep their kernel at every row count: a copy dequantized for the call (8 MiB in
# bfloat16) stays in the last-level cache for its matmul, where a larger one costs about what the dense matmul saves,
# and a tied or large lm_head is never copied whole (a 262k-row one would take hundreds of MiB).
GGUF_DEQUANTIZED_MAX_WEIGHTS = 1 << 22


def tiles_max_rows(ggml_type: int, shape: torch.Size) -> float:
    """The most rows a layer kept as tiles of `ggml_type` multiplies by them; more: by the weight dequantized."""
    min_rows = GGUF_TILES_DEQUANTIZED_MIN_ROWS.get(ggml_type)
    if min_rows is None or shape.numel() > GGUF_DEQUANTIZED_MAX_WEIGHTS:
        return math.inf
    return min_rows - 1


def default_gguf_kernel(device: torch.device) -> str:
    """pagedllm's CPU kernel where it builds, else the reference."""
    return "pagedllm" if device.type == "cpu" and cpu_kernels_available() else "reference"


class GGUFLinear(nn.Module):
    """y = x Wᵀ + b with W kept as the GGUF file's blocks (resident bytes: the file's).

    Up to GGUF_PACKED_MATMUL_MAX_ROWS rows (any number for GGUF_ANY_ROWS_TYPES, and for GGUF_TILE_TYPES, kept as
    `tiles` instead of `blocks`, up to tiles_max_rows) go through the kernel; more rows multiply by a dense copy when
    one is kept (`dense_matmul_min_rows` > 0: inputs of at least that many rows take it), else by the weight
    dequantized for the call.
    Every path computes with the same weights; the kernel's rounds activations to int8 per block.
    """

    def __init__(
        self,
        weight: GGUFWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dense_matmul_min_rows: int | None = 0,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.ggml_type = weight.ggml_type
        self.dtype = dtype
        # No dense copy unless asked for: it would take 2-4x the blocks' memory.
        self.dense_matmul_min_rows = dense_matmul_min_rows or 0
        self.kernel = default_gguf_kernel(weight.blocks.device) if kernel is None else kernel
        if self.kernel not in GGUF_KERNELS:
            raise ValueError(f"kernel must be one of {GGUF_KERNELS}, got {self.kernel!r}")
        self.register_buffer("blocks", weight.blocks.contiguous())
        self.register_buffer("tiles", None)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
        dense = matrix_units_layout(self.dequantized(dtype)) if self.dense_matmul_min_rows > 0 else None
        self.register_buffer("dense", dense)
        # A tied embedding table keeps its blocks alone: tiles beside them would hold its bytes twice.
        if (
            self.kernel == "pagedllm"
            and self.ggml_type in GGUF_TILE_TYPES
            and self.out_features % GGUF_TILE_OUTPUTS == 0
            and not weight.table
        ):
            self.tiles = torch.ops.pagedllm.kquant_tiles(self.blocks, self.ggml_type)
            self.blocks = None

    def weight(self) -> GGUFWeight:
        return GGUFWeight(self.blocks, self.ggml_type)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` (by the kernel where it runs, else by the reference: the same values)."""
        if self.tiles is not None:
            return torch.ops.pagedllm.kquant_dequantize(self.tiles, self.ggml_type, dtype)
        if self.kernel == "pagedllm":
            return torch.ops.pagedllm.gguf_dequantize(self.blocks, self.ggml_type, dtype)
        return dequantize_blocks(self.weight()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.dense is not None and (self.kernel == "reference" or rows >= self.dense_matmul_min_rows):
            return dense_linear(x, self.dense, self.bias)
        if self.kernel == "reference":
            return F.linear(x, dequantize_blocks(self.weight()).to(x.dtype), self.bias)
        if self.tiles is not None and rows > tiles_max_rows(self.ggml_type, self.weight_shape):
            return dense_linear(x, self.dequantized(x.dtype), self.bias)
        if self.tiles is not None:
            y = torch.ops.pagedllm.kquant_linear(x, self.tiles, self.ggml_type)
            return y if self.bias is None else y + self.bias
        if rows > GGUF_PACKED_MATMUL_MAX_ROWS and self.ggml_type not in GGUF_ANY_ROWS_TYPES:
            return dense_linear(x, self.dequantized(x.dtype), self.bias)
        y = torch.ops.pagedllm.gguf_linear(x, self.blocks, self.ggml_type)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        layout = ", tiles" if self.tiles is not None else ""
        return f"{self.in_features}, {self.out_features}, {gguf.GGMLQuantizationType(self.ggml_type).name}{layout}"


class GGUFEmbedding(nn.Module):
    """A token embedding table kept as GGUF blocks: each lookup dequantizes only the rows it takes, by the kernel
    where it runs (into the model dtype in one pass), else by `reference` (the same values)."""

    def __init__(self, weight: GGUFWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.ggml_type = weight.ggml_type
        self.dtype = dtype
        self.register_buffer("blocks", weight.blocks.contiguous())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks[input_ids.reshape(-1)]
        if use_cpu_kernels(blocks):
            rows = torch.ops.pagedllm.gguf_dequantize(blocks, self.ggml_type, self.dtype)
        else:
            rows = self.reference(blocks)
        return rows.view(*input_ids.shape, -1)

    def reference(self, blocks: torch.Tensor) -> torch.Tensor:
        """The rows of `blocks` (whole rows of the table) dequantized by the PyTorch reference."""
        return dequantize_blocks(GGUFWeight(blocks, self.ggml_type)).to(self.dtype)
