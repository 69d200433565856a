"""All decoder layers of an all-decode step in one CPU kernel call (torch.ops.pagedllm.decode_layers).

At batch 1 a decode step's ops each take tens of microseconds, and the Python frames and dispatcher calls between
them cost about as much again; the kernel runs the same kernels in the same order as the layers' forward does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.kernels import use_cpu_kernels
from pagedllm.layers.attention import AttentionMetadata
from pagedllm.layers.linear import Linear, QuantizedLinear, dense_rows

if TYPE_CHECKING:
    from pagedllm.model.llama import LlamaForCausalLM

# Group size codes of the weight kinds the kernel multiplies without int4 groups (see decode_layers.cpp).
DENSE, INT8 = -1, 0


@dataclass(frozen=True)
class StackedLinear:
    """One linear as the kernel takes it."""

    weight: torch.Tensor
    scales: torch.Tensor  # empty for a dense weight
    group_size: int  # DENSE, INT8 or the int4 group size
    bias: torch.Tensor | None
    max_rows: float  # the most rows for which this layer's own forward takes the same path


def stacked_linear(layer: nn.Module) -> StackedLinear | None:
    """The kernel's view of a dense Linear or of a QuantizedLinear on pagedllm's kernels; None for any other."""
    if isinstance(layer, Linear):
        return StackedLinear(layer.weight, torch.empty(0), DENSE, layer.bias, math.inf)
    if not isinstance(layer, QuantizedLinear) or layer.kernel != "pagedllm":
        return None
    group_size = layer.group_size if layer.bits == 4 else INT8
    return StackedLinear(layer.qweight, layer.scales, group_size, layer.bias, layer.packed_max_rows)


@dataclass
class DecodeStack:
    """Every layer's norms, linears and K/V pools, listed once for the kernel."""

    config: ModelConfig
    cos: torch.Tensor  # the rotary tables
    signed_sin: torch.Tensor
    norms: list[torch.Tensor]
    weights: list[torch.Tensor]
    scales: list[torch.Tensor]
    group_sizes: list[int]
    biases: list[torch.Tensor | None]
    k_pools: list[torch.Tensor]
    v_pools: list[torch.Tensor]
    max_rows: float  # steps with more tokens take the layers' forward

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> DecodeStack | None:
        """The stack of a model on CPU kernels with plain (unquantized) K/V pools, fast attention without a sliding
        window and linears the kernel takes; None for any other."""
        norms, linears, k_pools, v_pools = [], [], [], []
        for layer in model.layers:
            attention = layer.self_attn.attn
            pools = (attention.k_cache, attention.v_cache)
            plain_pools = all(isinstance(p, torch.Tensor) and use_cpu_kernels(p) for p in pools)
            if attention.impl != "fast" or attention.sliding_window is not None or not plain_pools:
                return None
            k_pools.append(attention.k_cache)
            v_pools.append(attention.v_cache)
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            modules = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            stacked = [stacked_linear(module) for module in modules]
            if any(linear is None for linear in stacked):
                return None
            linears += stacked
        return cls(
            model.config,
            model.rotary.cos,
            model.rotary.signed_sin,
            norms,
            [linear.weight for linear in linears],
            [linear.scales for linear in linears],
            [linear.group_size for linear in linears],
            [linear.bias for linear in linears],
            k_pools,
            v_pools,
            min(linear.max_rows for linear in linears),
        )

    def takes(self, hidden: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step can run in the kernel: every sequence decodes one token, and few enough of them."""
        return meta.num_decodes == len(meta.context_lens) and hidden.shape[0] <= self.max_rows

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The residual stream after the last layer, as LlamaForCausalLM.forward returns it."""
        config = self.config
        return torch.ops.pagedllm.decode_layers(
            hidden,
            positions,
            self.cos,
            self.signed_sin,
            self.norms,
            self.weights,
            self.scales,
            self.group_sizes,
            self.biases,
            self.k_pools,
            self.v_pools,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            config.num_heads,
            config.num_kv_heads,
            config.rms_norm_eps,
            config.head_dim**-0.5,
            dense_rows(hidden, self.weights[0]),
        )
