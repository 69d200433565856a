"""GGUF Q8_0 weights rearranged into tiles of 16 output channels (the file's bytes, in another order): the one layout
their matmul takes up to prefill-sized steps, so that a row's outputs do not depend on the rows beside it, and the
one copy a tied embedding table's lookups read."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.arithmetic import ceil_div
from pagedllm.kernels import use_cpu_kernels
from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.gguf_linear import default_gguf_kernel, tiles_max_rows
from pagedllm.layers.linear import dense_linear, matrix_units_layout

Q8_0_TILE = 16  # output channels per tile
Q8_0_BLOCK = 32  # input channels per block (one float16 scale)
Q8_0_STEP = 4  # input channels per step: a tile's step is 16 x 4 bytes, one 512-bit vector
Q8_0_BLOCK_BYTES = 34  # a block in the file: its float16 scale, then 32 signed bytes
# Stored bytes are the file's signed values plus 128: the kernel multiplies unsigned weight bytes by signed
# activation bytes (VNNI's dpbusd).
Q8_0_TILE_OFFSET = 128


@dataclass
class Q8_0Tiles:
    """A Q8_0 weight [out, in], w = d * c per block of 32 inputs, padded with zero channels to whole tiles.

    tiles[t, 512 b + 64 s + 4 o + j] = c(16 t + o, 32 b + 4 s + j) + 128 and scales[t, 16 b + o] = d(16 t + o, b).
    """

    tiles: torch.Tensor  # [ceil(out / 16), in / 32 * 512] uint8
    scales: torch.Tensor  # [ceil(out / 16), in / 32 * 16] float16
    out_features: int

    @classmethod
    def from_blocks(cls, weight: GGUFWeight) -> Q8_0Tiles:
        if weight.ggml_type != gguf.GGMLQuantizationType.Q8_0:
            raise ValueError(f"Q8_0 tiles take Q8_0 blocks, not {weight.type_name}")
        out_features, in_features = weight.shape
        num_tiles, num_blocks = ceil_div(out_features, Q8_0_TILE), in_features // Q8_0_BLOCK
        blocks = F.pad(weight.blocks, (0, 0, 0, num_tiles * Q8_0_TILE - out_features))  # zero channels: d = 0
        blocks = blocks.view(num_tiles, Q8_0_TILE, num_blocks, Q8_0_BLOCK_BYTES)
        scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # [tile, o, b]
        values = blocks[..., 2:] ^ Q8_0_TILE_OFFSET  # c + 128 from c's two's complement byte
        values = values.view(num_tiles, Q8_0_TILE, num_blocks, Q8_0_BLOCK // Q8_0_STEP, Q8_0_STEP)
        tiles = values.permute(0, 2, 3, 1, 4).reshape(num_tiles, -1).contiguous()  # tile, b, s, o, j
        return cls(tiles, scales.transpose(1, 2).reshape(num_tiles, -1).contiguous(), out_features)

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] // Q8_0_TILE * Q8_0_BLOCK

    def values(self) -> torch.Tensor:
        """c as int8 [tiles, 16, blocks, 32]: tile, output, block, input."""
        num_tiles = self.tiles.shape[0]
        steps = self.tiles.view(num_tiles, -1, Q8_0_BLOCK // Q8_0_STEP, Q8_0_TILE, Q8_0_STEP)
        return (steps ^ Q8_0_TILE_OFFSET).view(torch.int8).permute(0, 3, 1, 2, 4).flatten(-2)

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix, each weight float32(c) * float32(d) as gguf's reference computes it."""
        num_tiles = self.tiles.shape[0]
        d = self.scales.view(num_tiles, -1, Q8_0_TILE).transpose(1, 2).float()  # [tile, o, b]
        weights = self.values().float() * d.unsqueeze(-1)
        return weights.reshape(num_tiles * Q8_0_TILE, -1)[: self.out_features]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 weights of output channels `index` (1-D) [len(index), in], as dequantize() computes them."""
        num_tiles = self.tiles.shape[0]
        tile, channel = index // Q8_0_TILE, index % Q8_0_TILE
        steps = self.tiles.view(num_tiles, -1, Q8_0_BLOCK // Q8_0_STEP, Q8_0_TILE, Q8_0_STEP)[tile, :, :, channel]
        c = (steps ^ Q8_0_TILE_OFFSET).view(torch.int8).float()  # [n, blocks, 8, 4]
        d = self.scales.view(num_tiles, -1, Q8_0_TILE)[tile, :, channel].float()  # [n, blocks]
        return (c * d[:, :, None, None]).flatten(1)


class Q8_0Linear(nn.Module):
    """y = x Wᵀ + b with a GGUF Q8_0 weight kept as Q8_0Tiles (the file's bytes).

    Up to tiles_max_rows rows go through the kernel, whose rows each get the same bits alone or beside others; more
    multiply by the weight dequantized for the call. A dense copy is kept only when asked for (`dense_matmul_min_rows`
    > 0: inputs of at least that many rows take it). The kernel rounds activations to int8 per block of 32, the
    reference path multiplies the dequantized weight.
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
        self.ggml_type = gguf.GGMLQuantizationType.Q8_0
        self.dtype = dtype
        self.dense_matmul_min_rows = dense_matmul_min_rows or 0
        self.kernel = default_gguf_kernel(weight.blocks.device) if kernel is None else kernel
        tiles = Q8_0Tiles.from_blocks(weight)
        self.register_buffer("tiles", tiles.tiles)
        self.register_buffer("scales", tiles.scales)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)
        dense = matrix_units_layout(tiles.dequantize().to(dtype)) if self.dense_matmul_min_rows > 0 else None
        self.register_buffer("dense", dense)

    def weight(self) -> Q8_0Tiles:
        return Q8_0Tiles(self.tiles, self.scales, self.out_features)

    @property
    def tiles_max_rows(self) -> float:
        """The most rows `forward` multiplies by the tiles with the kernel (more: the weight dequantized)."""
        return tiles_max_rows(self.ggml_type, torch.Size((self.out_features, self.in_features)))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` (by the kernel where it runs, else by the reference: the same values)."""
        if self.kernel == "pagedllm":
            return torch.ops.pagedllm.q8_0_tiles_dequantize(self.tiles, self.scales, self.out_features, dtype)
        return self.weight().dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.dense is not None and (self.kernel == "reference" or rows >= self.dense_matmul_min_rows):
            return dense_linear(x, self.dense, self.bias)
        if self.kernel == "reference":
            return F.linear(x, self.weight().dequantize().to(x.dtype), self.bias)
        if rows > self.tiles_max_rows:
            return dense_linear(x, self.dequantized(x.dtype), self.bias)
        y = torch.ops.pagedllm.q8_0_tiles_linear(x, self.tiles, self.scales, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, Q8_0 tiles"


class Q8_0Embedding(nn.Module):
    """A token embedding table read from Q8_0Tiles (a tied lm_head's own): each lookup dequantizes only its rows, by
    the kernel where it runs (into the model dtype in one pass), else by `Q8_0Tiles.rows` (the same values)."""

    def __init__(self, weight: Q8_0Tiles, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features = weight.out_features
        self.dtype = dtype
        self.register_buffer("tiles", weight.tiles)
        self.register_buffer("scales", weight.scales)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        index = input_ids.reshape(-1)
        if use_cpu_kernels(self.tiles):
            rows = torch.ops.pagedllm.q8_0_tiles_rows(self.tiles, self.scales, self.out_features, index, self.dtype)
        else:
            rows = self.reference(index)
        return rows.view(*input_ids.shape, -1)

    def reference(self, index: torch.Tensor) -> torch.Tensor:
        return Q8_0Tiles(self.tiles, self.scales, self.out_features).rows(index).to(self.dtype)
