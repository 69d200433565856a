"""Read a checkpoint (GGUF file or Hugging Face folder) into a ModelConfig and HF-named tensors."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from pagedllm.config import ModelConfig, RopeScaling
from pagedllm.errors import UnsupportedModelError
from pagedllm.layers.gguf_blocks import GGUF_NATIVE_TYPES, GGUFWeight
from pagedllm.layers.quantization import Int4Weight, LinearQuantization, QuantizedWeight, select_rows
from pagedllm.model.lazy_weights import CheckpointWeights, LazyWeights, StoredLayout
from pagedllm.model.registry import GGUF_ARCHITECTURES, hf_architecture, model_class
from pagedllm.quantize.checkpoint import is_awq_checkpoint, load_awq_weights

if TYPE_CHECKING:
    from pagedllm.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

GGUF_TENSOR_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q5_0,
        gguf.GGMLQuantizationType.Q5_1,
        gguf.GGMLQuantizationType.Q4_K,
        gguf.GGMLQuantizationType.Q5_K,
        gguf.GGMLQuantizationType.Q6_K,
        gguf.GGMLQuantizationType.Q8_K,
    }
)

GGUF_LAYER_TENSORS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Where Gemma 3 files differ: its ffn_norm is the norm before the MLP, and it has QK-norms and post-norms.
GGUF_GEMMA3_LAYER_TENSORS: dict[str, str] = {
    **GGUF_LAYER_TENSORS,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Gemma 3 has a global attention layer after every 5 sliding-window ones (a GGUF file does not say so).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GGUF_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
# Q4_0 and Q4_1 projections go to the int4 kernel's tiles (a float16 scale and min per 32 weights: Q4_1's bytes,
# Q4_0's and a min of -8 scale), faster at every row count than the blocks (its lanes are outputs, so one
# activation load meets 8 of them), which for Q4_0 outweighs its 11% more bytes; a tied table stays blocks, once
# for both the lookup and the lm_head.
GGUF_INT4_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1}
)
GGUF_Q4_GROUP = 32


@dataclass
class Checkpoint:
    """A loaded checkpoint: its shape and its weights under Hugging Face names (quantized linears as such)."""

    config: ModelConfig
    weights: CheckpointWeights  # a GGUF file's: LazyWeights
    path: Path
    file_weight_bytes: int = 0  # bytes the weights take in the file (0: not known)


def load_checkpoint(path: Path, dtype: torch.dtype, keep_quantized: bool = False) -> Checkpoint:
    """Load a .gguf file or an HF folder, casting weights to `dtype`.

    With `keep_quantized`, GGUF weights stored in one of GGUF_NATIVE_TYPES come back as GGUFWeight, the file's
    blocks (linears of GGUF_INT4_TYPES as Int4Weight, the same values); a tied embedding table is one GGUFWeight
    under both its names (the lookup and lm_head.weight).
    """
    if path.is_dir():
        return _load_hf_folder(path, dtype)
    return _load_gguf(path, dtype, keep_quantized)


def load_model_config(path: Path) -> ModelConfig:
    """The shape of the model in a .gguf file or an HF folder, without reading its weights."""
    if path.is_dir():
        return hf_model_config(json.loads((path / "config.json").read_text()))
    return gguf_model_config(gguf.GGUFReader(str(path)))


def _load_hf_folder(path: Path, dtype: torch.dtype) -> Checkpoint:
    raw_config = json.loads((path / "config.json").read_text())
    config = hf_model_config(raw_config)
    if is_awq_checkpoint(raw_config):
        return Checkpoint(config, load_awq_weights(path, raw_config, dtype), path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    names = [(file, name) for file in files for name in _safetensors_names(file)]
    # Gemma's RMSNorm multiplies by (1 + w): stored as that multiplier, as GGUF files store it.
    norm_offset = 1.0 if config.architecture == "gemma3" else 0.0
    with tqdm(total=len(names), desc=f"Loading {path.name}", unit="tensor", leave=False) as progress:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if norm_offset and name.endswith("norm.weight"):
                        tensor = tensor.float() + norm_offset
                    weights[name] = tensor.to(dtype)
                    progress.update()
    return Checkpoint(config, weights, path, sum(file.stat().st_size for file in files))


def _safetensors_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def hf_model_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json (transformers 4 or 5 layout)."""
    architecture = hf_architecture(raw.get("architectures") or [raw.get("model_type", "?")])
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    num_heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    sliding_window = raw.get("sliding_window")
    if architecture == "qwen2" and not raw.get("use_sliding_window", False):
        sliding_window = None
    gemma = _hf_gemma3_fields(raw) if architecture == "gemma3" else {}
    if "rope_theta" in gemma:
        rope_theta, rope = gemma.pop("rope_theta"), gemma.pop("rope")
    return ModelConfig(
        architecture=architecture,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling(rope),
        attention_bias=architecture == "qwen2" or bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        **gemma,
    )


def _hf_gemma3_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's own settings (transformers 4 or 5 layout); rope and rope_theta are the global layers'."""
    if raw.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("attention logit soft-capping is not supported")
    num_layers = raw["num_hidden_layers"]
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or GEMMA3_SLIDING_WINDOW_PATTERN
    layer_types = raw.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
    ]
    parameters = raw.get("rope_parameters") or {}
    if "full_attention" in parameters:
        rope, local = parameters["full_attention"], parameters.get("sliding_attention", {})
    else:
        rope = raw.get("rope_scaling") or {}
        local = {"rope_theta": raw.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)}
    return {
        "rope": rope,
        "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
        "full_attention_layers": tuple(i for i, kind in enumerate(layer_types) if kind == "full_attention"),
        "rope_local_theta": float(local.get("rope_theta", GEMMA3_LOCAL_ROPE_THETA)),
        "local_rope_scaling": _rope_scaling(local),
        "query_pre_attn_scalar": raw.get("query_pre_attn_scalar"),
        "final_logit_softcapping": raw.get("final_logit_softcapping"),
    }


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
        raise UnsupportedModelError(
            f"unsupported RoPE scaling type {rope_type!r}: supported are default, llama3, linear"
        )
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(rope["factor"]),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


def _load_gguf(path: Path, dtype: torch.dtype, keep_quantized: bool = False) -> Checkpoint:
    reader = gguf.GGUFReader(str(path))
    config = gguf_model_config(reader)
    readers: dict[str, Callable[[], torch.Tensor | QuantizedWeight]] = {}
    layouts: dict[str, StoredLayout] = {}
    for tensor in reader.tensors:
        name = _hf_tensor_name(tensor.name, config.architecture)
        if tensor.tensor_type not in GGUF_TENSOR_TYPES:
            raise UnsupportedModelError(f"tensor {tensor.name} has unsupported GGUF type {tensor.tensor_type.name}")
        kept = keep_quantized and tensor.tensor_type in GGUF_NATIVE_TYPES
        linear = _quantized_linear_name(name, config) if kept else None
        read = partial(_read_gguf_tensor, tensor, name, config, dtype, kept, linear)
        in_blocks = linear is not None or _kept_table(name, kept)
        block_columns = gguf.GGML_QUANT_SIZES[tensor.tensor_type][0] if in_blocks else 1
        layouts[name] = StoredLayout(tuple(int(d) for d in reversed(tensor.shape)), block_columns)
        if linear is not None and linear != name:
            # A tied table: the embedding lookup and the lm_head read the same blocks, one object under both names.
            read = cache(read)
            readers[linear] = read
            layouts[linear] = layouts[name]
        readers[name] = read
    weights = LazyWeights(readers, f"Loading {path.name}", layouts)
    return Checkpoint(config, weights, path, sum(int(tensor.n_bytes) for tensor in reader.tensors))


def _read_gguf_tensor(
    tensor: gguf.ReaderTensor,
    name: str,
    config: ModelConfig,
    dtype: torch.dtype,
    kept: bool,
    linear: str | None,
) -> torch.Tensor | QuantizedWeight:
    """One GGUF tensor under HF name `name`: kept in the file's blocks (`kept`; the linear weight `linear` as
    gguf_linear_weight stores it, a tied table as blocks), else dequantized to `dtype`."""
    heads = _rope_interleaved_heads(name, config)
    if linear is not None:
        quantized = gguf_blocks_weight(tensor, table=True) if linear != name else gguf_linear_weight(tensor)
        if heads is not None:
            order = _unpermute_rope_rows(np.arange(quantized.shape[0]), heads)
            quantized = select_rows(quantized, torch.from_numpy(order))
        return quantized
    if _kept_table(name, kept):
        return gguf_blocks_weight(tensor)
    array = gguf.quants.dequantize(read_tensor_data(tensor), tensor.tensor_type)
    array = array.reshape([int(d) for d in reversed(tensor.shape)])
    if heads is not None:
        array = _unpermute_rope_rows(array, heads)
    return torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)


def _kept_table(name: str, kept: bool) -> bool:
    """Whether tensor `name` is the embedding table, kept in the file's blocks (its lookups read them)."""
    return kept and name == "model.embed_tokens.weight"


def read_tensor_data(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor's data as the reader shapes it, read into memory of its own: pages of the reader's map of the
    file count as this process's resident memory once touched, for as long as the reader lives."""
    data = tensor.data
    return np.fromfile(data.filename, dtype=data.dtype, count=data.size, offset=tensor.data_offset).reshape(data.shape)


def _rope_interleaved_heads(name: str, config: ModelConfig) -> int | None:
    """The head count of a Q or K weight whose rows llama.cpp interleaved for its RoPE; None for other tensors."""
    if config.architecture in ("qwen2", "gemma3"):
        return None
    if name.endswith("q_proj.weight"):
        return config.num_heads
    if name.endswith("k_proj.weight"):
        return config.num_kv_heads
    return None


def _quantized_linear_name(name: str, config: ModelConfig) -> str | None:
    """The linear weight a GGUF tensor provides when kept quantized (a tied embedding table: lm_head), else None."""
    if name.endswith("_proj.weight") or name == "lm_head.weight":
        return name
    if name == "model.embed_tokens.weight" and config.tie_word_embeddings:
        return "lm_head.weight"
    return None


def gguf_blocks_weight(tensor: gguf.ReaderTensor, table: bool = False) -> GGUFWeight:
    """A tensor as the file's blocks, one row of blocks per output row."""
    blocks = read_tensor_data(tensor).view(np.uint8).reshape(int(tensor.shape[1]), -1)
    return GGUFWeight(torch.from_numpy(blocks), int(tensor.tensor_type), table)


def gguf_linear_weight(tensor: gguf.ReaderTensor) -> QuantizedWeight:
    """A linear's tensor as its blocks, or for GGUF_INT4_TYPES as int4 with llama.cpp's own groups of 32."""
    if tensor.tensor_type not in GGUF_INT4_TYPES:
        return gguf_blocks_weight(tensor)
    rows = int(tensor.shape[1])
    block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    blocks = read_tensor_data(tensor).reshape(rows, -1, block_bytes)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1:
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:  # Q4_0: w = d * (q - 8)
        mins = -8 * scales
        nibbles = blocks[..., 2:]
    # Byte j of a block holds element j in its low nibble and element j + 16 in its high one.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    return Int4Weight(torch.from_numpy(q), torch.from_numpy(scales), torch.from_numpy(mins), GGUF_Q4_GROUP)


def _hf_tensor_name(gguf_name: str, architecture: str) -> str:
    if gguf_name in GGUF_GLOBAL_TENSORS:
        return GGUF_GLOBAL_TENSORS[gguf_name]
    layer_tensors = GGUF_GEMMA3_LAYER_TENSORS if architecture == "gemma3" else GGUF_LAYER_TENSORS
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}"
    raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows so RoPE can rotate halves as Hugging Face does."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_model_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}: supported are {', '.join(GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    scaling_type = get("rope.scaling.type", "none")
    rope_scaling = RopeScaling()
    if scaling_type == "linear":
        rope_scaling = RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor", 1.0)))
    elif scaling_type not in ("none", None):
        raise UnsupportedModelError(f"unsupported GGUF RoPE scaling {scaling_type!r}")
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    num_layers = int(get("block_count"))
    return ModelConfig(
        architecture=arch if arch in ("qwen2", "gemma3") else "llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        **(_gguf_gemma3_fields(get, num_layers) if arch == "gemma3" else {}),
    )


def _gguf_gemma3_fields(get: Any, num_layers: int) -> dict[str, Any]:
    """Gemma 3's own settings from a GGUF file; queries are scaled by head_dim, as llama.cpp scales them."""
    cap = get("final_logit_softcapping")
    return {
        "sliding_window": int(get("attention.sliding_window")),
        "full_attention_layers": tuple(i for i in range(num_layers) if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0),
        "rope_local_theta": GEMMA3_LOCAL_ROPE_THETA,
        "final_logit_softcapping": None if cap is None else float(cap),
    }


def build_model(
    checkpoint: Checkpoint, max_model_len: int, attention_impl: str, quantization: LinearQuantization
) -> LlamaForCausalLM:
    """The model of a loaded checkpoint with its weights in place, its linears stored as `quantization` says."""
    config = checkpoint.config
    model = model_class(config.architecture)(
        config, max_model_len, attention_impl, checkpoint.weights.get("rope_freqs"), quantization
    )
    model.load_weights(checkpoint.weights)
    return model
