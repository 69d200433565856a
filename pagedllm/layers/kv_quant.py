"""KV-cache quantization: int8 or packed int4 codes with one float16 scale and uint8 zero point per token and head.

Each (token, kv-head) vector x of head_dim values is stored as codes q in [0, 2**bits - 1] with
x ≈ (q - zero) * scale. The range quantized is [min(x, 0), max(x, 0)]: it holds 0, so the integer zero point
always lies in [0, 2**bits - 1] and fits a uint8 (a float zero would cost a byte more per token-head, and for
head_dim 64 take the int8 cache under 1.9x the tokens of a bfloat16 one).

A pool rotates each vector by an orthonormal Hadamard matrix H before quantizing it (as QuaRot does): RoPE'd keys
carry a few outlier channels that set a row's min-max range alone; rotated, their energy spreads over every channel
and the per-row range shrinks. H is symmetric and orthonormal, so attention runs unchanged on q H against the
stored K H and V H, and one more product by H turns its output back: a cost per new token, not per cached one.
(docs/performance.md has the perplexities that chose this format.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_BITS = {"int8": 8, "int4": 4}

_FP16 = torch.finfo(torch.float16)


@dataclass
class QuantizedKV:
    """Quantized K or V entries: codes [..., head_dim * bits // 8] uint8, scales and zeros [...]."""

    codes: torch.Tensor
    scales: torch.Tensor  # float16
    zeros: torch.Tensor  # uint8


def quantize(x: torch.Tensor, bits: int) -> QuantizedKV:
    """Asymmetric min-max quantization of x [..., head_dim] over its last dimension."""
    qmax = 2**bits - 1
    x = x.float()
    low = x.amin(-1).clamp(max=0)
    high = x.amax(-1).clamp(min=0)
    # The floor keeps an all-zero row from dividing by zero; the ceiling keeps float16 finite.
    exact = ((high - low) / qmax).clamp(_FP16.tiny, _FP16.max)
    scales = exact.to(torch.float16)
    # Step up where float16 rounded down: the stored scale must span the range or the largest value clips.
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, _FP16.max)), scales)
    scale = scales.float()
    zeros = torch.round(-low / scale).clamp(0, qmax)
    codes = (torch.round(x / scale.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax).to(torch.uint8)
    if bits == 4:
        codes = pack_int4(codes)
    return QuantizedKV(codes, scales, zeros.to(torch.uint8))


def dequantize(entries: QuantizedKV, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(codes - zero) * scale in dtype, [..., head_dim]."""
    codes = entries.codes
    scale = entries.scales.to(torch.float32).unsqueeze(-1)
    # codes * scale widens the codes in the same pass; the zero's offset is then subtracted in place. (A fused
    # addcmul broadcasting both per-row terms takes a much slower path on CPU.)
    if bits == 8:
        values = torch.mul(codes, scale)
    else:  # each nibble straight into its half, without materializing the unpacked codes
        half = codes.shape[-1]
        values = torch.empty(*codes.shape[:-1], 2 * half, dtype=torch.float32, device=codes.device)
        torch.mul(codes & 0x0F, scale, out=values[..., :half])
        torch.mul(codes >> 4, scale, out=values[..., half:])
    return values.sub_(entries.zeros.to(torch.float32).unsqueeze(-1) * scale).to(dtype)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal, symmetric n x n Hadamard matrix (Sylvester construction scaled by n**-0.5), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: the first half of the last dimension in the low nibbles, the second in the high.

    Halves rather than even/odd pairs: unpacking then writes two contiguous runs per row, several times faster on
    CPU than interleaving.
    """
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


class QuantizedKVPool:
    """One layer's K or V pool, [num_blocks, block_size, num_kv_heads, head_dim] stored quantized.

    Entries are stored, and read back, rotated by `rotation` (see `rotate`); a head_dim that is not a power of two
    has no Sylvester Hadamard matrix, and its pool stores entries unrotated (`rotation` is None).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        bits: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if bits not in KV_CACHE_BITS.values():
            raise ValueError(f"KV-cache quantization supports 8 or 4 bits, got {bits}")
        if head_dim * bits % 8:
            raise ValueError(
                f"int{bits} KV cache needs head_dim * {bits} to be a whole number of bytes, got {head_dim}"
            )
        rows = (num_blocks, block_size, num_kv_heads)
        self.bits = bits
        self.dtype = dtype  # what reads dequantize into: the model's dtype
        self.head_dim = head_dim
        self.codes = torch.zeros(*rows, head_dim * bits // 8, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(rows, dtype=torch.float16, device=device)
        self.zeros = torch.zeros(rows, dtype=torch.uint8, device=device)
        self.rotation = hadamard(head_dim).to(device) if head_dim & (head_dim - 1) == 0 else None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., head_dim] in the basis the pool stores entries in, in x's dtype; the rotation is its own inverse."""
        if self.rotation is None:
            return x
        return (x.float() @ self.rotation).to(x.dtype)

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, bits: int) -> int:
        """Codes, scale and zero point of every kv head for one token."""
        return num_kv_heads * (head_dim * bits // 8 + torch.float16.itemsize + torch.uint8.itemsize)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the pool it stands for: [num_blocks, block_size, num_kv_heads, head_dim]."""
        return (*self.scales.shape, self.head_dim)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scales, self.zeros

    def write(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        """Rotate and quantize x [T, kv_heads, head_dim] into flat slots (block * block_size + offset)."""
        entries = quantize(self.rotate(x.float()), self.bits)
        for pool, new in zip(self.tensors(), (entries.codes, entries.scales, entries.zeros)):
            pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, new)

    def read(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The given blocks' entries dequantized, still rotated: [*block_ids.shape, block_size, kv_heads, head_dim]."""
        entries = QuantizedKV(_gather_rows(self.codes, block_ids), self.scales[block_ids], self.zeros[block_ids])
        return dequantize(entries, self.bits, self.dtype)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for pool in self.tensors():
            pool[dst] = pool[src]


def _gather_rows(codes: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """codes[block_ids], moved as 4-byte words where the rows allow: indexing copies uint8 one byte at a time."""
    if codes.shape[-1] % 4:
        return codes[block_ids]
    return codes.view(torch.int32)[block_ids].view(torch.uint8)
