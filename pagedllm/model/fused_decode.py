"""All decoder layers of an all-decode step in one CPU kernel call (torch.ops.pagedllm.fused_decode).

At batch 1 a decode step's ops each take tens of microseconds, and the Python frames and dispatcher calls between
them cost about as much again; the kernel runs the same kernels in the same order as the layers' forward does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.kernels import use_cpu_kernels
from pagedllm.layers.attention import AttentionMetadata, KVPool
from pagedllm.layers.linear import Linear, QuantizedLinear, dense_rows
from pagedllm.model.llama import LlamaForCausalLM


@functools.cache
def weight_kinds() -> tuple[int, int]:
    """The group size codes of dense and int8 weights, as the kernel defines them (ops.h)."""
    dense, int8 = torch.ops.pagedllm.fused_decode_weight_kinds()
    return dense, int8


@dataclass(frozen=True)
class StackedLinear:
    """One linear as the kernel takes it."""

    weight: torch.Tensor
    scales: torch.Tensor  # empty for a dense weight
    group_size: int  # weight_kinds() for dense or int8 weights, else the int4 group size
    bias: torch.Tensor | None
    max_rows: float  # the most rows for which this layer's own forward takes the same path


def stacked_linear(layer: nn.Module) -> StackedLinear | None:
    """The kernel's view of a dense Linear or of a QuantizedLinear on pagedllm's kernels; None for any other."""
    dense, int8 = weight_kinds()
    if isinstance(layer, Linear):
        return StackedLinear(layer.weight, torch.empty(0), dense, layer.bias, math.inf)
    if not isinstance(layer, QuantizedLinear) or layer.kernel != "pagedllm":
        return None
    group_size = layer.group_size if layer.bits == 4 else int8
    return StackedLinear(layer.qweight, layer.scales, group_size, layer.bias, layer.packed_max_rows)


@dataclass
class FusedDecode:
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
    def of(cls, model: nn.Module, k_pools: list[KVPool], v_pools: list[KVPool]) -> FusedDecode | None:
        """The stack of a Llama-family model over plain (unquantized) K/V pools on CPU kernels, with fast attention
        without a sliding window and linears the kernel takes; None for any other."""
        if not isinstance(model, LlamaForCausalLM):
            return None
        if not all(isinstance(pool, torch.Tensor) and use_cpu_kernels(pool) for pool in (*k_pools, *v_pools)):
            return None
        norms, linears = [], []
        for layer in model.layers:
            attention = layer.self_attn.attn
            if attention.impl != "fast" or attention.sliding_window is not None:
                return None
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
            list(k_pools),
            list(v_pools),
            min(linear.max_rows for linear in linears),
        )

    def takes(self, meta: AttentionMetadata) -> bool:
        """Whether this step can run in the kernel: every sequence decodes one token, few enough of them, and no
        attention scores are asked for (the kernel does not report them)."""
        return (
            meta.attention_scores is None
            and meta.num_decodes == len(meta.seq_lens)
            and meta.num_decodes <= self.max_rows
        )

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The residual stream after the last layer, as LlamaForCausalLM.forward returns it, from the embeddings."""
        config = self.config
        return torch.ops.pagedllm.fused_decode(
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
