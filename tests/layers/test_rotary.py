"""Rotary embeddings: the per-step row lookup shared by the layers never serves another step's positions."""

from __future__ import annotations

import torch

from pagedllm.config import RopeScaling
from pagedllm.layers.rotary import RotaryEmbedding, _rotate_half


def rotated_directly(rotary: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def test_each_positions_tensor_gets_its_own_rows() -> None:
    rotary = RotaryEmbedding(8, 64, 10000.0, RopeScaling())
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    for values in ([0, 1, 2], [5, 6, 7], [5, 6, 7], [9, 3, 1]):
        positions = torch.tensor(values)
        for _ in range(2):  # the second call is served from the lookup of the first
            q_rot, k_rot = rotary(positions, q, k)
            assert torch.equal(q_rot, rotated_directly(rotary, positions, q))
            assert torch.equal(k_rot, rotated_directly(rotary, positions, k))


def test_position_zero_is_the_identity_and_norms_are_kept() -> None:
    rotary = RotaryEmbedding(16, 32, 10000.0, RopeScaling())
    x = torch.randn(4, 1, 16)
    rotated, _ = rotary(torch.tensor([0, 3, 7, 31]), x, x)
    assert torch.allclose(rotated[0], x[0])
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
