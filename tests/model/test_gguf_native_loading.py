"""A mixed GGUF file (as llama.cpp's Q4_K_M writes them) loads with each tensor's type kept and the file's size."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from pagedllm.layers.gguf_linear import GGUFEmbedding, GGUFLinear
from pagedllm.layers.linear import QuantizedLinear
from pagedllm.layers.quantization import LinearQuantization
from pagedllm.layers.quantized_linears import RowStackedLinear
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import load_checkpoint
from tests.gguf_blocks import random_blocks

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 64
# Per layer, each projection's type, as Q4_K_M mixes them (and Q5_0, Q8_0, Q4_0, Q4_1 as other files do).
LAYER_TYPES = (
    {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_0, "ffn_gate": Q.Q4_K,
     "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q5_K, "attn_k": Q.Q5_K, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K, "ffn_gate": Q.Q4_0,
     "ffn_up": Q.Q4_1, "ffn_down": Q.Q5_K},
)  # fmt: skip
SHAPES = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "attn_v": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}


def add_quantized(writer: gguf.GGUFWriter, name: str, qtype: Q, rows: int, cols: int, seed: int) -> None:
    writer.add_tensor(name, random_blocks(qtype, rows, cols, seed), raw_dtype=qtype)


def write_mixed_gguf(path: Path, layer_types: tuple[dict[str, Q], ...] = LAYER_TYPES) -> None:
    """A tiny Llama whose layers mix GGUF types as `layer_types` says, with a tied Q6_K embedding table."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_eos_token_id(2)
    add_quantized(writer, "token_embd.weight", Q.Q6_K, VOCAB, HIDDEN, 100)  # tied: also the lm_head
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for layer, types in enumerate(layer_types):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for seed, (name, qtype) in enumerate(types.items()):
            add_quantized(writer, f"blk.{layer}.{name}.weight", qtype, *SHAPES[name], seed=10 * layer + seed)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_each_linear_keeps_its_type_and_the_weights_take_the_files_bytes(mixed_gguf: Path) -> None:
    checkpoint = load_checkpoint(mixed_gguf, torch.float32, keep_quantized=True)
    model = LlamaForCausalLM(checkpoint.config, 64, quantization=LinearQuantization("auto"))
    model.load_weights(checkpoint.weights)
    for layer, types in zip(model.layers, LAYER_TYPES, strict=True):
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv, RowStackedLinear)
        assert [p.ggml_type for p in qkv.parts] == [types["attn_q"], types["attn_k"], types["attn_v"]]
        assert isinstance(layer.self_attn.o_proj, GGUFLinear)
        assert layer.self_attn.o_proj.ggml_type == types["attn_output"]
        assert layer.mlp.down_proj.ggml_type == types["ffn_down"]
    gate_up = model.layers[0].mlp.gate_up_proj
    assert isinstance(gate_up, GGUFLinear) and gate_up.ggml_type == Q.Q4_K  # two Q4_K parts: one block matrix
    mixed_gate_up = model.layers[1].mlp.gate_up_proj
    # Q4_0 and Q4_1 both become int4 tiles (Q4_1's bytes, Q4_0's and a float16 min per 32 weights): one matrix.
    assert isinstance(mixed_gate_up, QuantizedLinear) and (mixed_gate_up.bits, mixed_gate_up.group_size) == (4, 32)
    assert isinstance(model.embed_tokens, GGUFEmbedding) and model.lm_head.ggml_type == Q.Q6_K
    file_bytes = sum(t.n_bytes for t in gguf.GGUFReader(str(mixed_gguf)).tensors)
    assert checkpoint.file_weight_bytes == file_bytes
    assert model.weight_bytes() <= 1.1 * file_bytes, model.weight_bytes() / file_bytes


def test_the_kept_layers_compute_what_the_dense_load_computes(mixed_gguf: Path) -> None:
    models = {}
    for method in ("auto", "none"):
        checkpoint = load_checkpoint(mixed_gguf, torch.float32, keep_quantized=method == "auto")
        models[method] = LlamaForCausalLM(checkpoint.config, 64, quantization=LinearQuantization(method))
        models[method].load_weights(checkpoint.weights)
    native, dense = models["auto"], models["none"]
    assert dense.weight_bytes() > 3 * native.weight_bytes()
    token_ids = torch.tensor([[5, 9, 2, 33, 17, 4, 60]])
    assert torch.equal(native.embed_tokens(token_ids), dense.embed_tokens(token_ids))
    x = torch.randn(7, HIDDEN)
    for layer_index in range(LAYERS):
        for owner, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj")):
            ours = getattr(getattr(native.layers[layer_index], owner), name)(x)
            reference = getattr(getattr(dense.layers[layer_index], owner), name)(x)
            assert (ours - reference).norm() <= 2e-2 * reference.norm(), (layer_index, name)
    logits = native.lm_head(x)
    assert (logits - dense.lm_head(x)).norm() <= 2e-2 * logits.norm()
