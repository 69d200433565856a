"""RMSNorm, computed in float32 whatever the activation dtype."""

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.kernels import use_cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_cpu_kernels(x):
            return torch.ops.pagedllm.rms_norm(x, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in float32, then scaled in the activation dtype, as transformers' Llama does.
        normalized = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normalized.to(x.dtype)
