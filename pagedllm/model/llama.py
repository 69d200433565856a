"""The Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) over a paged KV cache."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.pipeline import PipelineStage
from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.attention import AttentionMetadata, KVPool, PagedAttention
from pagedllm.layers.linear import Linear
from pagedllm.layers.mlp import GatedMLP
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.parallel_linear import (
    ParallelLMHead,
    RowBlock,
    VocabParallelEmbedding,
    attention_projections,
    attention_rows,
    balanced_channels,
)
from pagedllm.layers.quantization import LinearQuantization
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.model.lazy_weights import CheckpointWeights
from pagedllm.model.weights import check_all_used, load_embedding, load_lm_head, load_projections, weight_bytes


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, attention_impl: str, group: ParallelGroup) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.head_dim = config.head_dim
        self.qkv_proj: nn.Module = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj: nn.Module = Linear(self.q_size, config.hidden_size)
        groups = None
        if group.world_size > 1:  # this rank's heads only
            self.qkv_proj, self.o_proj, heads = attention_projections(
                config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, group, config.attention_bias
            )
            self.num_heads, self.num_kv_heads, groups = len(heads.queries), len(heads.kv_heads), heads.groups
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, config.head_dim, attention_impl, groups=groups)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        heads = self.qkv_proj(hidden).view(hidden.shape[0], -1, self.head_dim)
        # Queries and keys rotate together, in place: one call for both.
        self.rotary.rotate_(positions, heads, self.num_heads + self.num_kv_heads)
        q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        attention_impl: str,
        group: ParallelGroup,
        channels: RowBlock | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary, attention_impl, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, silu_and_mul, group, channels)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it is added); the first layer gets no residual."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Token ids of a ragged batch in, final hidden states out; `compute_logits` on the rows that need them.

    The plain forward, layer by layer: the reference that the model runner's fused paths must agree with.
    With a `group` of several ranks, this process holds one rank's shard (see layers/parallel_linear.py).
    """

    def __init__(
        self,
        config: ModelConfig,
        max_positions: int,
        attention_impl: str = "fast",
        rope_freq_factors: torch.Tensor | None = None,
        quantization: LinearQuantization | None = None,
        group: ParallelGroup | None = None,
        stage: PipelineStage | None = None,
        channel_unit: int = 0,
    ) -> None:
        """With a `group`, the MLP's channels split evenly in runs of `channel_unit` (0: one channel at a time;
        balanced_channels); column_unit gives the runs a checkpoint's down_proj can be split into."""
        super().__init__()
        group = group or ParallelGroup()
        self.stage = stage or PipelineStage.whole(config.num_layers)
        windows = config.layer_sliding_windows()[self.stage.layers.start : self.stage.layers.stop]
        # A stage's model is a model of its own layers: the KV cache and runner size themselves by them.
        config = dataclasses.replace(config, num_layers=len(self.stage.layers))
        self.config = config
        self.quantization = quantization or LinearQuantization()
        # A placeholder that load_weights replaces: left unwritten, its pages are never made resident.
        self.embed_tokens: nn.Module = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.hidden_size))
        self.rotary = RotaryEmbedding(
            config.head_dim, max_positions, config.rope_theta, config.rope_scaling, rope_freq_factors
        )
        channels = None
        if group.world_size > 1 and channel_unit:
            rows = attention_rows(config.num_heads, config.num_kv_heads, config.head_dim, group.world_size)
            channels = balanced_channels(config.intermediate_size, rows, channel_unit)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary, attention_impl, group, channels) for _ in range(config.num_layers)
        )
        for layer, window in zip(self.layers, windows, strict=True):
            layer.self_attn.attn.sliding_window = window  # Mistral's, and Qwen2's where it uses one
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Module = Linear(config.hidden_size, config.vocab_size)
        if group.world_size > 1:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, group)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The final hidden states; a stage before the last hands its layers' output on and returns it unfinished."""
        if self.stage.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            dtype, device = self.norm.weight.dtype, self.norm.weight.device
            hidden, residual = self.stage.receive_activations(len(input_ids), self.config.hidden_size, dtype, device)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        if not self.stage.is_last:
            self.stage.send_activations(hidden, residual)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab] from final hidden states."""
        return self.lm_head(self.norm(hidden)).float()

    def rotary_for(self, sliding_window: int | None) -> RotaryEmbedding:
        """The RoPE tables of the layers with this sliding window (None: whole context): one for all layers."""
        return self.rotary

    def bind_kv_cache(self, k_pools: list[KVPool], v_pools: list[KVPool]) -> None:
        for layer, k_pool, v_pool in zip(self.layers, k_pools, v_pools, strict=True):
            layer.self_attn.attn.bind_pools(k_pool, v_pool)

    def load_weights(self, weights: CheckpointWeights) -> None:
        """Take HF-named weights (tensors or quantized), fusing q/k/v and gate/up; fails on a missing or extra one.

        Linears are stored as `self.quantization` says. A tied lm_head uses the embedding table unless the
        checkpoint carries a quantized copy of it under lm_head.weight; the table is dense unless kept as GGUF blocks.
        """
        remaining = weights.copy()  # names left to take; a LazyWeights copy reads each weight as it is taken
        take = remaining.pop
        embedding = take("model.embed_tokens.weight")
        self.norm.weight.data = take("model.norm.weight")
        dtype = self.norm.weight.dtype
        load_embedding(self, "embed_tokens", embedding, dtype)
        lm_head = remaining.pop("lm_head.weight", None)
        if lm_head is None or (self.config.tie_word_embeddings and isinstance(lm_head, torch.Tensor)):
            lm_head = embedding
        load_lm_head(self, lm_head, embedding, dtype, self.quantization)
        del lm_head  # the layer keeps its own form: the checkpoint's is freed before the layers load
        remaining.pop("rope_freqs", None)  # already applied by RotaryEmbedding at construction
        _drop_other_stages_layers(remaining, self.stage.layers)
        for i, layer in zip(self.stage.layers, self.layers, strict=True):
            prefix = f"model.layers.{i}."
            layer.input_layernorm.weight.data = take(prefix + "input_layernorm.weight")
            layer.post_attention_layernorm.weight.data = take(prefix + "post_attention_layernorm.weight")
            load_projections(layer, prefix, take, dtype, self.quantization, self.config.attention_bias)
        check_all_used(remaining)

    def weight_bytes(self) -> int:
        """Bytes held by the weights (quantized values, scales and dense copies; shared tensors once)."""
        return weight_bytes(self)


def _drop_other_stages_layers(weights: CheckpointWeights, layers: range) -> None:
    """Remove the weights of the layers other pipeline stages hold."""
    for name in [name for name in weights if name.startswith("model.layers.")]:
        if int(name.split(".")[2]) not in layers:
            del weights[name]
