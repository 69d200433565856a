"""Loading linear layers from checkpoint tensors, and counting the bytes a model's weights hold."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.gguf_linear import GGUFEmbedding
from pagedllm.layers.linear import Linear
from pagedllm.layers.quantization import LinearQuantization, QuantizedWeight
from pagedllm.layers.quantized_linears import quantized_linear


def load_embedding(owner: nn.Module, name: str, table: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> None:
    """Load a token embedding table: GGUF blocks stay blocks (looked up row by row), anything else is dense."""
    if isinstance(table, GGUFWeight):
        setattr(owner, name, GGUFEmbedding(table, dtype))
    else:
        getattr(owner, name).weight.data = table


def load_linear(
    owner: nn.Module,
    name: str,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    quantization: LinearQuantization,
    lm_head: bool = False,
) -> None:
    """Load one linear layer, replacing it by a quantized one (quantized_linear) where its weight is stored so."""
    layer: Linear = getattr(owner, name)
    weight = quantization.prepare(weight, dtype, lm_head)
    if isinstance(weight, torch.Tensor):
        layer.load(weight, bias)
        return
    if weight.shape != layer.weight.shape:
        raise ValueError(f"{name} weight shape {tuple(weight.shape)} != expected {tuple(layer.weight.shape)}")
    if layer.bias is not None and bias is None:
        raise ValueError("checkpoint lacks a bias this layer needs")
    setattr(owner, name, quantized_linear(weight, bias, dtype, quantization.dense_matmul_min_rows))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's weights (quantized values, scales and dense copies; shared tensors once)."""
    tensors = list(model.state_dict(keep_vars=True).values())
    # A weight in oneDNN's own layout (matrix_units_layout) is opaque: it has no storage to share or to ask.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors if not t.is_mkldnn}
    opaque = sum(t.numel() * t.element_size() for t in tensors if t.is_mkldnn)
    return sum(storage.nbytes() for storage in storages.values()) + opaque
