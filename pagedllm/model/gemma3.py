"""The Gemma 3 decoder over a paged KV cache: sliding-window layers between global ones, QK-norm, GeGLU.

Norm weights are the multipliers (1 + w) that Gemma's RMSNorm applies, as GGUF files store them; the loader adds
the 1 to a Hugging Face checkpoint's w. Sliding-window and global layers rotate with RoPE tables of their own bases.
With a `group` of several ranks, this process holds one tensor-parallel rank's shard, split as Llama's is
(layers/parallel_linear.py); the norms after attention and MLP apply to the sums of the ranks' outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.pipeline import PipelineStage
from pagedllm.kernels import use_cpu_kernels
from pagedllm.layers.activation import gelu_tanh_and_mul
from pagedllm.layers.attention import AttentionMetadata, KVPool, PagedAttention
from pagedllm.layers.kv_cache_groups import kv_cache_layout
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


def scale_embeddings(embeddings: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Embeddings times sqrt(hidden_size), in the model dtype as transformers does: the factor rounded to it first."""
    return embeddings * torch.tensor(hidden_size**0.5, dtype=embeddings.dtype)


class Gemma3Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        sliding_window: int | None,
        attention_impl: str,
        group: ParallelGroup,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj: nn.Module = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj: nn.Module = Linear(q_size, config.hidden_size)
        groups = None
        if group.world_size > 1:  # this rank's heads only
            self.qkv_proj, self.o_proj, heads = attention_projections(
                config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, group, config.attention_bias
            )
            self.num_heads, self.num_kv_heads, groups = len(heads.queries), len(heads.kv_heads), heads.groups
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, config.head_dim, attention_impl, sliding_window, scale, groups
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        heads = self.qkv_proj(hidden).view(hidden.shape[0], -1, self.head_dim)
        self.norm_and_rotate_(positions, heads)
        q, k, v = heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, meta))

    def norm_and_rotate_(self, positions: torch.Tensor, heads: torch.Tensor) -> None:
        """Query and key heads of heads [T, q + k + v heads, head_dim] normalized over head_dim, then rotated, in
        place (on CPU one kernel call); value heads are left as they are."""
        q_end, k_end = self.num_heads, self.num_heads + self.num_kv_heads
        if use_cpu_kernels(heads) and self.q_norm.eps == self.k_norm.eps:
            cos, sin = self.rotary.cos, self.rotary.sin
            weights = (self.q_norm.weight, self.k_norm.weight)
            torch.ops.pagedllm.rms_norm_rotate_heads_(
                heads, positions, cos, sin, *weights, self.q_norm.eps, q_end, k_end - q_end
            )
            return
        for norm, start, end in ((self.q_norm, 0, q_end), (self.k_norm, q_end, k_end)):
            normed = norm(heads[:, start:end].reshape(-1, self.head_dim))
            heads[:, start:end] = normed.view(heads.shape[0], end - start, self.head_dim)
        self.rotary.rotate_(positions, heads, k_end)


class Gemma3DecoderLayer(nn.Module):
    """Norms before and after both attention and MLP; the residual stream adds the post-normed outputs."""

    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        sliding_window: int | None,
        attention_impl: str,
        group: ParallelGroup,
        channels: RowBlock | None,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Gemma3Attention(config, rotary, sliding_window, attention_impl, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, gelu_tanh_and_mul, group, channels)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's post-normed MLP output, the residual stream before it is added); the first gets none."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, meta))
        hidden, residual = self.pre_feedforward_layernorm.add_and_norm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3ForCausalLM(nn.Module):
    """Token ids of a ragged batch in, final hidden states out; `compute_logits` on the rows that need them.

    Takes the constructor arguments of LlamaForCausalLM; it has no RoPE frequency factors, and runs in one
    pipeline stage.
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
        super().__init__()
        if rope_freq_factors is not None:
            raise ValueError("Gemma 3 takes no RoPE frequency factors")
        group = group or ParallelGroup()
        self.stage = stage or PipelineStage.whole(config.num_layers)
        if self.stage.num_stages > 1:
            raise ValueError("Gemma 3 runs in one pipeline stage")
        self.config = config
        self.quantization = quantization or LinearQuantization()
        # A placeholder that load_weights replaces: left unwritten, its pages are never made resident.
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.hidden_size))
        self.global_rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        local_theta = config.rope_local_theta or config.rope_theta
        local_scaling = config.local_rope_scaling if config.rope_local_theta else config.rope_scaling
        self.local_rotary = RotaryEmbedding(config.head_dim, max_positions, local_theta, local_scaling)
        channels = None
        if group.world_size > 1 and channel_unit:
            rows = attention_rows(config.num_heads, config.num_kv_heads, config.head_dim, group.world_size)
            channels = balanced_channels(config.intermediate_size, rows, channel_unit)
        windows = config.layer_sliding_windows()
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(
                config,
                self.global_rotary if window is None else self.local_rotary,
                window,
                attention_impl,
                group,
                channels,
            )
            for window in windows
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Module = Linear(config.hidden_size, config.vocab_size)
        if group.world_size > 1:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, group)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = scale_embeddings(self.embed_tokens(input_ids), self.config.hidden_size)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab] from final hidden states, soft-capped where the model says so."""
        logits = self.lm_head(self.norm(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def rotary_for(self, sliding_window: int | None) -> RotaryEmbedding:
        """The RoPE tables of the layers with this sliding window (None: the global layers')."""
        return self.global_rotary if sliding_window is None else self.local_rotary

    def bind_kv_cache(self, k_pools: list[KVPool], v_pools: list[KVPool]) -> None:
        """Each layer's pools, and the KV-cache group (kv_cache_layout) whose block tables it reads."""
        layout = kv_cache_layout(self.config)
        for i, (layer, k_pool, v_pool) in enumerate(zip(self.layers, k_pools, v_pools, strict=True)):
            layer.self_attn.attn.bind_pools(k_pool, v_pool, layout.group_of(i))

    def load_weights(self, weights: CheckpointWeights) -> None:
        """Take HF-named weights, fusing q/k/v and gate/up; fails on a missing or extra one. Embeddings are tied."""
        remaining = weights.copy()  # names left to take; a LazyWeights copy reads each weight as it is taken
        take = remaining.pop
        embedding = take("model.embed_tokens.weight")
        self.norm.weight.data = take("model.norm.weight")
        dtype = self.norm.weight.dtype
        load_embedding(self, "embed_tokens", embedding, dtype)
        lm_head = remaining.pop("lm_head.weight", None)
        if lm_head is None or isinstance(lm_head, torch.Tensor):
            lm_head = embedding
        load_lm_head(self, lm_head, embedding, dtype, self.quantization)
        del lm_head  # the layer keeps its own form: the checkpoint's is freed before the layers load
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            for norm in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ):
                getattr(layer, norm).weight.data = take(prefix + norm + ".weight")
            attn = layer.self_attn
            attn.q_norm.weight.data = take(prefix + "self_attn.q_norm.weight")
            attn.k_norm.weight.data = take(prefix + "self_attn.k_norm.weight")
            load_projections(layer, prefix, take, dtype, self.quantization, self.config.attention_bias)
        check_all_used(remaining)

    def weight_bytes(self) -> int:
        """Bytes held by the weights (quantized values, scales and dense copies; shared tensors once)."""
        return weight_bytes(self)
