"""Rotary position embeddings (rotate-half layout) with Llama 3 and linear frequency scaling."""

import math

import torch
from torch import nn

from pagedllm.config import RopeScaling
from pagedllm.kernels import use_cpu_kernels


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Keep high frequencies, divide low ones by `factor`, interpolate smoothly in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates query and key heads by their positions, from a cos/sin table built once."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.float()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # Half-width tables [positions, head_dim / 2]: both halves of a head turn by the same angles, so a
        # full-width table would hold every value twice (Gemma 3's 32k positions of 256 channels: 64 MiB more).
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        # Every layer rotates by the same positions tensor in a step: look its rows up once.
        self._rows_for: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim], positions: [T]."""
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; any heads of the step's tokens, e.g. queries and keys side by side."""
        cos, signed_sin = self._cos_sin(positions, x.dtype)
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def rotate_(self, positions: torch.Tensor, x: torch.Tensor, rotated_heads: int) -> None:
        """Rotate the first `rotated_heads` heads of x [T, heads, head_dim] in place (on CPU one kernel call)."""
        if use_cpu_kernels(x):
            torch.ops.pagedllm.rotate_heads_(x, positions, self.cos, self.sin, rotated_heads)
        else:
            x[:, :rotated_heads] = self.rotate(positions, x[:, :rotated_heads])

    def shift(self, x: torch.Tensor, distance: int | torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated for positions p, rotated for p - distance instead (rotations compose);
        `distance` is one for all rows or a [T] tensor of each row's."""
        y = x.float()
        cos, signed_sin = self.full_rows(distance)
        if isinstance(distance, torch.Tensor):
            cos, signed_sin = cos.unsqueeze(-2), signed_sin.unsqueeze(-2)
        return (y * cos - y.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)

    def full_rows(self, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and signed sin of positions `index` across a whole head: rotate_half(x) * sin is
        roll(x, half) * (sin with its first half negated), one op where there were three."""
        cos, sin = self.cos[index], self.sin[index]
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rows_for
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        cos, signed_sin = (rows.unsqueeze(1).to(dtype) for rows in self.full_rows(positions))
        self._rows_for = (positions, dtype, cos, signed_sin)
        return cos, signed_sin
