"""The AWQ int4 checkpoint: an HF-style folder whose linears are packed nibbles with float16 scales and mins.

Per quantized linear `X.weight` [out, in] the safetensors file holds `X.qweight` uint8 [out, in / 2]
(column 2j in the low nibble, 2j + 1 in the high one), `X.scales` and `X.mins` float16 [out, in / group];
w ≈ q * scale + min. A linear's group is the config's group_size, or a smaller power of two where that does
not divide its input width. Every other tensor is stored dense, as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedllm.config import ModelConfig
from pagedllm.errors import UnsupportedModelError
from pagedllm.layers.quantization import Int4Weight

QUANT_METHOD = "awq"
FORMAT = "pagedllm"
WEIGHTS_FILE = "model.safetensors"
PACKED, SCALES, MINS = ".qweight", ".scales", ".mins"
HF_ARCHITECTURE_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [out, in] → two per byte [out, in / 2]."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def hf_config(config: ModelConfig, group_size: int) -> dict[str, Any]:
    """A Hugging Face config.json for the model, with its quantization_config."""
    rope = config.rope_scaling
    raw: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE_NAMES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": config.attention_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "sliding_window": config.sliding_window,
        "use_sliding_window": config.sliding_window is not None,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "quantization_config": {
            "quant_method": QUANT_METHOD,
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "format": FORMAT,
        },
    }
    if rope.rope_type != "default":
        raw["rope_scaling"] = {
            "rope_type": rope.rope_type,
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return raw


def is_awq_checkpoint(raw_config: dict[str, Any]) -> bool:
    """Whether a config.json describes a checkpoint this module wrote."""
    quant = raw_config.get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD and quant.get("format") == FORMAT


def write_awq_checkpoint(
    folder: Path, config: ModelConfig, weights: dict[str, torch.Tensor | Int4Weight], group_size: int
) -> None:
    """config.json and model.safetensors (the caller adds the tokenizer files)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if isinstance(value, Int4Weight):
            base = name.removesuffix(".weight")
            tensors[base + PACKED] = pack_nibbles(value.q).contiguous()
            tensors[base + SCALES] = value.scales.half().contiguous()
            tensors[base + MINS] = value.mins.half().contiguous()
        else:
            tensors[name] = value.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "quant_method": QUANT_METHOD})
    (folder / "config.json").write_text(json.dumps(hf_config(config, group_size), indent=2) + "\n")


def load_awq_weights(
    folder: Path, raw_config: dict[str, Any], dtype: torch.dtype
) -> dict[str, torch.Tensor | Int4Weight]:
    """HF-named tensors of a checkpoint written by write_awq_checkpoint (its config.json is `raw_config`):
    Int4Weight for quantized linears, every other tensor cast to `dtype`. Each linear's group size follows from
    its shapes: the config's is the largest, used wherever it divides the input width."""
    max_group_size = int(raw_config["quantization_config"]["group_size"])
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    weights: dict[str, torch.Tensor | Int4Weight] = {}
    for name in [n for n in stored if n.endswith(PACKED)]:
        base = name.removesuffix(PACKED)
        try:
            scales, mins = stored.pop(base + SCALES), stored.pop(base + MINS)
        except KeyError as error:
            raise UnsupportedModelError(f"{folder}: {name} has no {error.args[0]}") from error
        q = unpack_nibbles(stored.pop(name))
        if scales.shape != mins.shape or q.shape[0] != scales.shape[0] or q.shape[1] % scales.shape[1]:
            raise UnsupportedModelError(
                f"{folder}: {base} has scales {tuple(scales.shape)} for weight {tuple(q.shape)}"
            )
        group_size = q.shape[1] // scales.shape[1]
        if group_size > max_group_size:
            raise UnsupportedModelError(
                f"{folder}: {base} has groups of {group_size}, above the config's {max_group_size}"
            )
        weights[base + ".weight"] = Int4Weight(q, scales.float(), mins.float(), group_size)
    weights.update({name: tensor.to(dtype) for name, tensor in stored.items()})
    return weights
