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

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x), the sum written into `residual` on the kernel path."""
        if use_cpu_kernels(x) and residual.is_contiguous():
            return torch.ops.pagedllm.add_rms_norm_(residual, x, self.weight, self.eps), residual
        residual = residual + x
        return self.reference(residual), residual

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in float32, then scaled in the activation dtype, as transformers' Llama does.
        normalized = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normalized.to(x.dtype)
