"""Linear projections; fused ones hold several projections' weights stacked by rows."""

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x Wᵀ + b with a frozen weight of shape [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take a checkpoint weight (and bias), checking its shape."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != expected {tuple(self.weight.shape)}")
        self.weight.data = weight.contiguous()
        if self.bias is not None:
            if bias is None:
                raise ValueError("checkpoint lacks a bias this layer needs")
            self.bias.data = bias.contiguous()
