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
from pagedllm.distributed.shared_memory import SharedMemoryCollectives
from pagedllm.kernels import use_cpu_kernels
from pagedllm.layers.attention import AttentionMetadata, HeadGroups, KVPool, PagedAttention
from pagedllm.layers.gguf_linear import GGUF_PACKED_MATMUL_MAX_ROWS, GGUFLinear, tiles_max_rows
from pagedllm.layers.linear import Linear, QuantizedLinear, dense_rows
from pagedllm.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.q8_0_tiles import Q8_0Linear
from pagedllm.layers.quantized_linears import RowStackedLinear
from pagedllm.model.gemma3 import Gemma3ForCausalLM, scale_embeddings
from pagedllm.model.llama import LlamaForCausalLM


@dataclass(frozen=True)
class WeightKinds:
    """The kernel's codes of its weight parts' kinds (ops.h)."""

    dense: int
    int8: int
    int4: int
    gguf: int
    kquant_tiles: int
    q8_0_tiles: int


@functools.cache
def weight_kinds() -> WeightKinds:
    return WeightKinds(*torch.ops.pagedllm.fused_decode_weight_kinds())


@dataclass(frozen=True)
class LinearPart:
    """One weight of a linear as the kernel takes it."""

    weight: torch.Tensor
    scales: torch.Tensor  # empty unless int8 or int4
    kind: int  # a weight_kinds() code
    kind_arg: int  # the int4 group size, the GGUF type (of blocks or tiles) or the Q8_0 tiles' out_features, else 0
    bias: torch.Tensor | None
    max_rows: float  # the most rows for which the layer's own forward takes the same path


def linear_parts(layer: nn.Module) -> list[LinearPart] | None:
    """The kernel's view of a linear (each part of fused projections stored in different kinds); None where the
    kernel cannot take it. A tensor-parallel linear is its rank's shard; the kernel sums a row-parallel one's output
    over the ranks, so it takes one only without a bias (added after the sum)."""
    kinds = weight_kinds()
    if isinstance(layer, ColumnParallelLinear):
        return linear_parts(layer.linear)
    if isinstance(layer, RowParallelLinear):
        return linear_parts(layer.linear) if layer.bias is None else None
    if isinstance(layer, RowStackedLinear):
        parts = [linear_parts(part) for part in layer.parts]
        return None if any(p is None for p in parts) else [q for p in parts for q in p]  # type: ignore[union-attr]
    if isinstance(layer, Linear):
        return [LinearPart(layer.weight, torch.empty(0), kinds.dense, 0, layer.bias, math.inf)]
    if isinstance(layer, QuantizedLinear) and layer.kernel == "pagedllm":
        kind, arg = (kinds.int4, layer.group_size) if layer.bits == 4 else (kinds.int8, 0)
        return [LinearPart(layer.qweight, layer.scales, kind, arg, layer.bias, layer.packed_max_rows)]
    if isinstance(layer, GGUFLinear) and layer.kernel == "pagedllm":
        # GGUFLinear.forward: a dense copy from dense_matmul_min_rows rows on, a dequantized matmul above
        # GGUF_PACKED_MATMUL_MAX_ROWS rows (tiles: above tiles_max_rows); the blocks or tiles below both.
        max_rows = GGUF_PACKED_MATMUL_MAX_ROWS
        if layer.tiles is not None:
            max_rows = tiles_max_rows(layer.ggml_type, layer.weight_shape)
        if layer.dense is not None:
            max_rows = min(max_rows, layer.dense_matmul_min_rows - 1)
        if layer.tiles is not None:
            return [LinearPart(layer.tiles, torch.empty(0), kinds.kquant_tiles, layer.ggml_type, layer.bias, max_rows)]
        return [LinearPart(layer.blocks, torch.empty(0), kinds.gguf, layer.ggml_type, layer.bias, max_rows)]
    if isinstance(layer, Q8_0Linear) and layer.kernel == "pagedllm":
        # Q8_0Linear.forward: a dense copy from dense_matmul_min_rows rows on, a dequantized matmul above
        # tiles_max_rows rows, the tiles below both.
        max_rows = layer.tiles_max_rows
        if layer.dense is not None:
            max_rows = min(max_rows, layer.dense_matmul_min_rows - 1)
        return [LinearPart(layer.tiles, layer.scales, kinds.q8_0_tiles, layer.out_features, layer.bias, max_rows)]
    return None


# The kernel's layer types, by the model classes whose layers they run, and each type's norms in kernel order.
LAYER_TYPES = {LlamaForCausalLM: "llama", Gemma3ForCausalLM: "gemma3"}
LAYER_NORMS = {
    "llama": ("input_layernorm", "post_attention_layernorm"),
    "gemma3": (
        "input_layernorm",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
}


@dataclass
class FusedDecode:
    """Every layer's norms, linears, rotary tables, K/V pools and KV-cache group, listed once for the kernel."""

    config: ModelConfig
    layer_type: str
    embedding_scale: bool  # whether the embeddings are scaled by sqrt(hidden_size) first (Gemma)
    cos: list[torch.Tensor]  # each layer's rotary tables
    sin: list[torch.Tensor]
    norms: list[torch.Tensor]
    parts: list[int]  # per linear, how many of the weights below it joins
    weights: list[torch.Tensor]
    scales: list[torch.Tensor]
    kinds: list[int]
    kind_args: list[int]
    biases: list[torch.Tensor | None]
    k_pools: list[torch.Tensor]
    v_pools: list[torch.Tensor]
    kv_cache_groups: list[int]  # each layer's
    sliding_windows: list[int]  # each layer's, 0 for none
    scale: float
    dense_weight: torch.Tensor | None  # a dense weight, whose dense_rows every dense part's matmul pads to
    max_rows: float  # steps with more tokens take the layers' forward

    num_heads: int  # this rank's
    num_kv_heads: int
    groups: HeadGroups  # which of the rank's K/V heads each of its query heads reads
    shared_memory: SharedMemoryCollectives | None  # the tensor-parallel group's, None with one rank

    @classmethod
    def of(cls, model: nn.Module, k_pools: list[KVPool], v_pools: list[KVPool]) -> FusedDecode | None:
        """The stack of a Llama-family or Gemma 3 model over plain (unquantized) K/V pools on CPU kernels, with
        fast attention and linears the kernel takes; None for any other. A tensor-parallel rank's stack takes all
        the model's layers (one pipeline stage) and sums through shared memory."""
        layer_type = LAYER_TYPES.get(type(model))
        if layer_type is None:
            return None
        o_proj = model.layers[0].self_attn.o_proj
        group = o_proj.group if isinstance(o_proj, RowParallelLinear) else None
        if group is not None and (group.shared_memory is None or model.stage.num_stages > 1):
            return None
        if not all(isinstance(pool, torch.Tensor) and use_cpu_kernels(pool) for pool in (*k_pools, *v_pools)):
            return None
        attentions: list[PagedAttention] = [layer.self_attn.attn for layer in model.layers]
        if any(attention.impl != "fast" for attention in attentions):
            return None
        parts, linears = [], []
        for layer in model.layers:
            modules = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for module in modules:
                stacked = linear_parts(module)
                if stacked is None:
                    return None
                parts.append(len(stacked))
                linears += stacked
        rotaries = [layer.self_attn.rotary for layer in model.layers]
        dense = [linear.weight for linear in linears if linear.kind == weight_kinds().dense]
        return cls(
            model.config,
            layer_type,
            layer_type == "gemma3",
            [rotary.cos for rotary in rotaries],
            [rotary.sin for rotary in rotaries],
            [
                model.get_submodule(f"layers.{i}.{norm}").weight
                for i in range(len(model.layers))
                for norm in LAYER_NORMS[layer_type]
            ],
            parts,
            [linear.weight for linear in linears],
            [linear.scales for linear in linears],
            [linear.kind for linear in linears],
            [linear.kind_arg for linear in linears],
            [linear.bias for linear in linears],
            list(k_pools),
            list(v_pools),
            [attention.kv_cache_group for attention in attentions],
            [attention.window_arg for attention in attentions],
            attentions[0].scale,
            dense[0] if dense else None,
            min(linear.max_rows for linear in linears),
            attentions[0].num_heads,
            attentions[0].num_kv_heads,
            attentions[0].groups,
            None if group is None else group.shared_memory,
        )

    def takes(self, meta: AttentionMetadata) -> bool:
        """Whether this step can run in the kernel: every sequence decodes one token, few enough of them, and no
        attention scores are asked for (the kernel does not report them)."""
        return (
            meta.attention_scores is None
            and meta.num_decodes == len(meta.seq_lens)
            and meta.num_decodes <= self.max_rows
        )

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The residual stream after the last layer, as the model's forward returns it, from the embeddings."""
        config = self.config
        hidden = scale_embeddings(embeddings, config.hidden_size) if self.embedding_scale else embeddings
        groups = [meta.for_group(group) for group in self.kv_cache_groups]
        shared_memory = self.shared_memory
        parallel = {}
        if shared_memory is not None:
            parallel = {
                "segment": shared_memory.segment,
                "rank": shared_memory.rank,
                "world_size": shared_memory.world_size,
                "timeout_s": shared_memory.timeout_s,
            }
        return torch.ops.pagedllm.fused_decode(
            hidden,
            positions,
            self.cos,
            self.sin,
            self.norms,
            self.weights,
            self.scales,
            self.kinds,
            self.kind_args,
            self.parts,
            self.biases,
            self.k_pools,
            self.v_pools,
            [group.slot_mapping for group in groups],
            [group.block_tables for group in groups],
            [group.seq_lens for group in groups],
            self.sliding_windows,
            self.layer_type,
            self.num_heads,
            self.num_kv_heads,
            config.rms_norm_eps,
            self.scale,
            hidden.shape[0] if self.dense_weight is None else dense_rows(hidden, self.dense_weight),
            self.groups.queries_per_kv,
            self.groups.query_offset,
            **parallel,
        )
