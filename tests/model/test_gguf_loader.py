"""GGUF files written by the tests from a tiny Llama: every supported tensor type loads to the right weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from pagedllm.errors import UnsupportedModelError
from pagedllm.model.loader import load_checkpoint

Q = gguf.GGMLQuantizationType
ROPE_THETA = 50000.0
CONFIG = transformers.LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


@pytest.fixture(scope="module")
def hf_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(CONFIG)
    return {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Q and K (pairs interleaved per head)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
        "output.weight": weights["lm_head.weight"],
    }
    for name, value in weights.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            if rest == "self_attn.q_proj.weight":
                value = llama_cpp_permute(value, CONFIG.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                value = llama_cpp_permute(value, CONFIG.num_key_value_heads)
            tensors[f"blk.{layer}.{GGUF_NAMES[rest]}"] = value
    return tensors


def write_gguf(path: Path, tensors: dict[str, np.ndarray], qtype: gguf.GGMLQuantizationType) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(CONFIG.num_hidden_layers)
    writer.add_context_length(CONFIG.max_position_embeddings)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_attention_heads)
    writer.add_head_count_kv(CONFIG.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_vocab_size(CONFIG.vocab_size)
    writer.add_eos_token_id(2)
    for name, value in tensors.items():
        if value.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, value.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Largest error each type may add to a weight of this scale (normal, std 0.02).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-4, Q.BF16: 1e-3, Q.Q8_0: 1e-3, Q.Q4_1: 1e-2, Q.Q4_0: 1.5e-2}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_gguf_weights_load_under_hf_names_in_hf_layout(
    qtype: gguf.GGMLQuantizationType, hf_weights: dict[str, np.ndarray], tmp_path: Path
) -> None:
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, gguf_tensors(hf_weights), qtype)
    checkpoint = load_checkpoint(path, torch.float32)
    config = checkpoint.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.rope_theta == ROPE_THETA and not config.tie_word_embeddings
    assert set(checkpoint.weights) == set(hf_weights)
    for name, expected in hf_weights.items():
        error = np.abs(checkpoint.weights[name].numpy() - expected).max()
        assert error <= TOLERANCE[qtype], f"{name}: {error}"


def test_unsupported_tensor_type_is_a_clear_error(hf_weights: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = tmp_path / "tiny-iq2.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 256)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_head_count(4)
    block_bytes = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS][1]
    writer.add_tensor("token_embd.weight", np.zeros((4, block_bytes), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        load_checkpoint(path, torch.float32)


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(path, torch.float32)
