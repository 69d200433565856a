"""Rotary embeddings: the per-step row lookup shared by the layers never serves another step's positions."""

from __future__ import annotations

import torch

from pagedllm.config import RopeScaling
from pagedllm.layers.rotary import RotaryEmbedding, inverse_frequencies


def rotated_directly(rotary: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rotate-half formula from the frequencies, position by position."""
    head_dim = x.shape[-1]
    angles = torch.outer(positions.float(), inverse_frequencies(head_dim, 10000.0, RopeScaling()))
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
    rotated_half = torch.cat((-x[..., head_dim // 2 :], x[..., : head_dim // 2]), dim=-1)
    return x * cos + rotated_half * sin


def test_each_positions_tensor_gets_its_own_rows() -> None:
    rotary = RotaryEmbedding(8, 64, 10000.0, RopeScaling())
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    for values in ([0, 1, 2], [5, 6, 7], [5, 6, 7], [9, 3, 1]):
        positions = torch.tensor(values)
        for _ in range(2):  # the second call is served from the lookup of the first
            q_rot, k_rot = rotary(positions, q, k)
            assert torch.allclose(q_rot, rotated_directly(rotary, positions, q), atol=1e-6)
            assert torch.allclose(k_rot, rotated_directly(rotary, positions, k), atol=1e-6)


def test_position_zero_is_the_identity_and_norms_are_kept() -> None:
    rotary = RotaryEmbedding(16, 32, 10000.0, RopeScaling())
    x = torch.randn(4, 1, 16)
    rotated, _ = rotary(torch.tensor([0, 3, 7, 31]), x, x)
    assert torch.allclose(rotated[0], x[0])
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_shift_rotates_keys_to_the_position_distance_earlier() -> None:
    rotary = RotaryEmbedding(8, 64, 10000.0, RopeScaling())
    keys = torch.randn(5, 2, 8)
    positions = torch.tensor([20, 33, 40, 41, 63])
    for distance in (0, 1, 17, 20):
        shifted = rotary.shift(rotary.rotate(positions, keys), distance)
        assert torch.allclose(shifted, rotated_directly(rotary, positions - distance, keys), atol=1e-5)


def test_tables_hold_each_angle_once_and_rotate_as_the_formula_does() -> None:
    # Both halves of a head turn by the same angles: a table of head_dim / 2 per position is all a rotation needs.
    rotary = RotaryEmbedding(256, 4096, 10000.0, RopeScaling())
    assert rotary.cos.shape == rotary.sin.shape == (4096, 128)
    x = torch.randn(6, 3, 256)
    positions = torch.tensor([0, 1, 511, 512, 2048, 4095])
    assert torch.allclose(rotary.rotate(positions, x), rotated_directly(rotary, positions, x), atol=1e-5)
