"""The gated MLP of Llama-family and Gemma decoders: down(act(gate) * up), gate and up fused in one linear."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedllm.layers.linear import Linear


class GatedMLP(nn.Module):
    """`activation_and_mul` takes the fused [gate | up] rows and returns act(gate) * up."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation_and_mul: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.activation_and_mul = activation_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation_and_mul(self.gate_up_proj(x)))
