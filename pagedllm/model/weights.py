"""Loading linear layers from checkpoint tensors, and counting the bytes a model's weights hold."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.gguf_linear import GGUFEmbedding
from pagedllm.layers.linear import Linear
from pagedllm.layers.parallel_linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedllm.layers.q8_0_tiles import Q8_0Embedding, Q8_0Linear
from pagedllm.layers.quantization import LinearQuantization, QuantizedWeight, fuse_rows
from pagedllm.layers.quantized_linears import quantized_linear


def load_embedding(owner: nn.Module, name: str, table: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> None:
    """Load a token embedding table: GGUF blocks stay blocks (looked up row by row), anything else is dense; a
    vocabulary-parallel table keeps this rank's rows."""
    layer = getattr(owner, name)
    if isinstance(layer, VocabParallelEmbedding):
        layer.load(table, dtype)
    elif isinstance(table, GGUFWeight):
        setattr(owner, name, GGUFEmbedding(table, dtype))
    else:
        layer.weight.data = table


def tie_embedding(owner: nn.Module, dtype: torch.dtype) -> None:
    """Where the lm_head keeps the tied GGUF table as Q8_0 tiles, the embedding lookups read those tiles: one copy
    of the table, in one layout."""
    if isinstance(owner.lm_head, Q8_0Linear) and isinstance(owner.embed_tokens, GGUFEmbedding):
        owner.embed_tokens = Q8_0Embedding(owner.lm_head.weight(), dtype)


def load_linear(
    owner: nn.Module,
    name: str,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    quantization: LinearQuantization,
    lm_head: bool = False,
) -> None:
    """Load one linear layer, replacing it by a quantized one (quantized_linear) where its weight is stored so; a
    tensor-parallel one keeps this rank's slice."""
    layer = getattr(owner, name)
    if isinstance(layer, ColumnParallelLinear | RowParallelLinear):
        layer.load(weight, bias, dtype, quantization)
        return
    assert isinstance(layer, Linear)
    weight = quantization.prepare(weight, dtype, lm_head)
    if isinstance(weight, torch.Tensor):
        layer.load(weight, bias)
        return
    if weight.shape != layer.weight.shape:
        raise ValueError(f"{name} weight shape {tuple(weight.shape)} != expected {tuple(layer.weight.shape)}")
    if layer.bias is not None and bias is None:
        raise ValueError("checkpoint lacks a bias this layer needs")
    setattr(owner, name, quantized_linear(weight, bias, dtype, quantization.dense_matmul_min_rows))


def load_lm_head(
    owner: nn.Module,
    weight: torch.Tensor | QuantizedWeight,
    embedding: torch.Tensor | QuantizedWeight,
    dtype: torch.dtype,
    quantization: LinearQuantization,
) -> None:
    """Load `owner.lm_head` from `weight`, which is `embedding` where the lm_head is tied to the embedding table; a
    vocabulary-parallel one keeps this rank's rows (a dense tied one sharing the embedding's); a tied Q8_0 table is
    then looked up from the lm_head's tiles (tie_embedding)."""
    if isinstance(owner.lm_head, ParallelLMHead):
        tied = owner.embed_tokens if weight is embedding else None
        owner.lm_head.load(weight, dtype, quantization, tied)
    else:
        load_linear(owner, "lm_head", weight, None, dtype, quantization, lm_head=True)
        if weight is embedding:
            tie_embedding(owner, dtype)


def load_projections(
    layer: nn.Module,
    prefix: str,
    take: Callable[[str], torch.Tensor | QuantizedWeight],
    dtype: torch.dtype,
    quantization: LinearQuantization,
    attention_bias: bool,
) -> None:
    """A decoder layer's attention and MLP linears from HF names under `prefix`: q/k/v and gate/up fused by rows."""
    attn = layer.self_attn
    qkv = fuse_rows([take(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv"], dtype)
    bias = torch.cat([take(f"{prefix}self_attn.{p}_proj.bias") for p in "qkv"]) if attention_bias else None
    load_linear(attn, "qkv_proj", qkv, bias, dtype, quantization)
    load_linear(attn, "o_proj", take(prefix + "self_attn.o_proj.weight"), None, dtype, quantization)
    gate_up = fuse_rows([take(prefix + "mlp.gate_proj.weight"), take(prefix + "mlp.up_proj.weight")], dtype)
    load_linear(layer.mlp, "gate_up_proj", gate_up, None, dtype, quantization)
    load_linear(layer.mlp, "down_proj", take(prefix + "mlp.down_proj.weight"), None, dtype, quantization)


def check_all_used(remaining: dict[str, object]) -> None:
    """Refuse a checkpoint with tensors the model did not take (HF's cached rotary frequencies aside)."""
    unused = [name for name in remaining if not name.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ValueError(f"checkpoint has tensors the model does not use: {unused[:5]}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's weights (quantized values, scales and dense copies; shared tensors once)."""
    tensors = list(model.state_dict(keep_vars=True).values())
    # A weight in oneDNN's own layout (matrix_units_layout) is opaque: it has no storage to share or to ask.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors if not t.is_mkldnn}
    opaque = sum(t.numel() * t.element_size() for t in tensors if t.is_mkldnn)
    return sum(storage.nbytes() for storage in storages.values()) + opaque
