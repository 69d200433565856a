"""The gated activations of MLPs: SiLU (Llama) and tanh-approximated GELU (Gemma)."""

import torch
import torch.nn.functional as F

from pagedllm.kernels import use_cpu_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection's output [..., 2 * n]."""
    if use_cpu_kernels(gate_up):
        return torch.ops.pagedllm.silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up of a fused gate/up projection's output [..., 2 * n] (Gemma's GeGLU)."""
    if use_cpu_kernels(gate_up):
        return torch.ops.pagedllm.gelu_tanh_and_mul(gate_up)
    return gelu_tanh_and_mul_reference(gate_up)


def gelu_tanh_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
