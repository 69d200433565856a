"""GGUF's quantized blocks kept as the file stores them (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q8_0), and their plain
PyTorch dequantization: the reference every faster path is checked against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

Q = gguf.GGMLQuantizationType
# The GGUF types a GGUFWeight keeps in the file's bits, for linears and embedding tables alike (a dense table would
# hold 2-4x the file's bytes).
GGUF_NATIVE_TYPES: tuple[Q, ...] = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q8_0)


@dataclass
class GGUFWeight:
    """A linear weight [out, in] as GGUF blocks: row n is bytes blocks[n] (in / block_values blocks)."""

    blocks: torch.Tensor  # [out, in / block_values * block_bytes] uint8
    ggml_type: int  # gguf.GGMLQuantizationType value
    table: bool = False  # also the token embedding table (tied): its blocks serve lookups as they are

    @property
    def shape(self) -> torch.Size:
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q(self.ggml_type)]
        return torch.Size((self.blocks.shape[0], self.blocks.shape[1] // block_bytes * block_values))

    @property
    def type_name(self) -> str:
        return Q(self.ggml_type).name


def _half(raw: torch.Tensor) -> torch.Tensor:
    """Float16 values of the last dimension's byte pairs, as float32 [..., n / 2]."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(raw: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes as [..., 2, k]: their low nibbles, then their high ones."""
    return torch.stack([raw & 0x0F, raw >> 4], dim=-2)


def _bits(raw: torch.Tensor, count: int, width: int = 1) -> torch.Tensor:
    """[..., k] bytes as [..., count, k]: field i is bits i * width .. (i + 1) * width - 1."""
    shifts = torch.arange(count, device=raw.device, dtype=torch.uint8)[:, None] * width
    return (raw.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # Byte j: value j in its low nibble, value j + 16 in its high one.
    return _half(b[..., :2]) * (_nibbles(b[..., 2:18]).flatten(-2).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _half(b[..., :2]) * _nibbles(b[..., 4:20]).flatten(-2).float() + _half(b[..., 2:4])


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[..., 2:].contiguous().view(torch.int8).float() * _half(b[..., :2])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # Byte j of qs: value j in its low nibble, value j + 16 in its high one; bit i of qh is value i's 5th bit.
    high = _bits(b[..., 2:6], 8).transpose(-1, -2).flatten(-2)  # bit i of the little-endian uint32
    q = _nibbles(b[..., 6:22]).flatten(-2) | (high << 4)
    return _half(b[..., :2]) * (q.to(torch.int8) - 16).float()


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and minimums of Q4_K/Q5_K blocks' 12 packed bytes, as float32 [..., 8]."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _k_quant(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K values: q [..., 8, 32] per sub-block of 32 times d * sc, less dmin * m."""
    scales, mins = _k_scales_mins(b[..., 4:16])
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
    return ((d * scales)[..., None] * q.float() - (dmin * mins)[..., None]).flatten(-2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # Each 64 values: 32 bytes, the first 32 values in the low nibbles, the next 32 in the high ones.
    q = _nibbles(b[..., 16:144].unflatten(-1, (4, 32))).flatten(-3, -2)
    return _k_quant(b, q)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[..., 48:176].unflatten(-1, (4, 32))).flatten(-3, -2)
    return _k_quant(b, q | (_bits(b[..., 16:48], 8) << 4))  # bit c of qh[l]: value 32 c + l's 5th bit


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # Per half of 128 values: 64 bytes of low nibbles (value 32 k + l: nibble k // 2 of byte l + 32 (k % 2)) and 32
    # bytes of 2-bit pairs (value 32 k + l: bits 2 k, 2 k + 1 of byte l).
    low = _nibbles(b[..., :128].unflatten(-1, (2, 2, 32))).transpose(-3, -2).flatten(-3, -2)  # [..., half, 4, 32]
    high = _bits(b[..., 128:192].unflatten(-1, (2, 32)), 4, width=2)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(*b.shape[:-1], 16, 16)
    scales = b[..., 192:208].contiguous().view(torch.int8).float()
    return ((_half(b[..., 208:210]) * scales)[..., None] * q).flatten(-2)


DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q8_0: _q8_0,
    Q.Q5_0: _q5_0,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}


def dequantize_blocks(weight: GGUFWeight) -> torch.Tensor:
    """The float32 [out, in] matrix, each value computed with the float32 operations gguf's reference uses."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q(weight.ggml_type)]
    rows = weight.blocks.shape[0]
    blocks = weight.blocks.view(rows, -1, block_bytes)
    return DEQUANTIZERS[weight.ggml_type](blocks).reshape(rows, -1)
