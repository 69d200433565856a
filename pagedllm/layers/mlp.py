"""The gated MLP of Llama-family and Gemma decoders: down(act(gate) * up), gate and up fused in one linear."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedllm.distributed.group import ParallelGroup
from pagedllm.layers.linear import Linear
from pagedllm.layers.parallel_linear import ColumnParallelLinear, RowBlock, RowParallelLinear


class GatedMLP(nn.Module):
    """`activation_and_mul` takes the fused [gate | up] rows and returns act(gate) * up. With a `group` of several
    ranks, each holds its share of the intermediate channels (as `channels` splits them, else evenly): gate/up split
    by output rows, down by input columns."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation_and_mul: Callable[[torch.Tensor], torch.Tensor],
        group: ParallelGroup | None = None,
        channels: RowBlock | None = None,
    ) -> None:
        super().__init__()
        self.gate_up_proj: nn.Module = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj: nn.Module = Linear(intermediate_size, hidden_size)
        if group is not None and group.world_size > 1:
            channels = channels or RowBlock(intermediate_size)
            self.gate_up_proj = ColumnParallelLinear(hidden_size, [channels, channels], group)
            self.down_proj = RowParallelLinear(channels, hidden_size, group)
        self.activation_and_mul = activation_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation_and_mul(self.gate_up_proj(x)))
