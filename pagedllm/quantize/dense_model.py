"""A plain full-context float forward of a Llama-family decoder over HF-named tensors, one layer at a time.

Calibration needs what the paged engine never keeps: every linear's input for whole sequences, and the
freedom to change one layer's weights before running the next. It doubles as a reference forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedllm.config import ModelConfig
from pagedllm.layers.rotary import RotaryEmbedding

# Called with (linear group name, its input [batch, tokens, features]) for every group of a layer.
Capture = Callable[[str, torch.Tensor], None]

Weights = dict[str, torch.Tensor]


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def make_rotary(config: ModelConfig, weights: Weights, max_positions: int) -> RotaryEmbedding:
    return RotaryEmbedding(
        config.head_dim, max_positions, config.rope_theta, config.rope_scaling, weights.get("rope_freqs")
    )


def _linear(x: torch.Tensor, weights: Weights, name: str) -> torch.Tensor:
    return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias"))


def layer_forward(
    config: ModelConfig,
    weights: Weights,
    index: int,
    hidden: torch.Tensor,
    rotary: RotaryEmbedding,
    capture: Capture | None = None,
) -> torch.Tensor:
    """One decoder layer over hidden [batch, tokens, hidden_size] with causal attention from position 0.

    `capture` sees the inputs of the four groups of linears that share one input:
    'qkv', 'o_proj', 'gate_up' and 'down_proj'.
    """
    p = layer_prefix(index)
    batch, tokens, _ = hidden.shape
    x = rms_norm(hidden, weights[p + "input_layernorm.weight"], config.rms_norm_eps)
    if capture:
        capture("qkv", x)
    q = _linear(x, weights, p + "self_attn.q_proj").view(batch, tokens, config.num_heads, config.head_dim)
    k = _linear(x, weights, p + "self_attn.k_proj").view(batch, tokens, config.num_kv_heads, config.head_dim)
    v = _linear(x, weights, p + "self_attn.v_proj").view(batch, tokens, config.num_kv_heads, config.head_dim)
    q, k = rotary(torch.arange(tokens), q, k)
    repeat = config.num_heads // config.num_kv_heads
    k = k.repeat_interleave(repeat, dim=2)
    v = v.repeat_interleave(repeat, dim=2)
    attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    attended = attended.transpose(1, 2).reshape(batch, tokens, config.num_heads * config.head_dim)
    if capture:
        capture("o_proj", attended)
    hidden = hidden + _linear(attended, weights, p + "self_attn.o_proj")
    x = rms_norm(hidden, weights[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    if capture:
        capture("gate_up", x)
    gated = F.silu(_linear(x, weights, p + "mlp.gate_proj")) * _linear(x, weights, p + "mlp.up_proj")
    if capture:
        capture("down_proj", gated)
    return hidden + _linear(gated, weights, p + "mlp.down_proj")


def embed(weights: Weights, token_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(token_ids, weights["model.embed_tokens.weight"])


def final_logits(config: ModelConfig, weights: Weights, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last layer's hidden states (the embedding doubles as lm_head when tied or absent)."""
    head = weights.get("lm_head.weight")
    if head is None or config.tie_word_embeddings:
        head = weights["model.embed_tokens.weight"]
    return F.linear(rms_norm(hidden, weights["model.norm.weight"], config.rms_norm_eps), head)


@torch.inference_mode()
def forward_logits(config: ModelConfig, weights: Weights, token_ids: torch.Tensor) -> torch.Tensor:
    """Float logits [batch, tokens, vocab] of token_ids [batch, tokens], full context, no cache."""
    rotary = make_rotary(config, weights, token_ids.shape[1])
    hidden = embed(weights, token_ids)
    for index in range(config.num_layers):
        hidden = layer_forward(config, weights, index, hidden, rotary)
    return final_logits(config, weights, hidden)
