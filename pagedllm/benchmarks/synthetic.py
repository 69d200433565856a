"""`pagedllm bench synth`: Llama-shaped GGUF files with random weights at real model sizes, for size benchmarks.

The weights are drawn from a scaled normal init (fan-in scaling, residual branches shrunk by the depth), so
activations stay finite at any depth; the tokenizer and vocabulary are the embedded SmolLM2's. Q4_0, Q8_0 and F16
files are written with `gguf`'s quantizers; Q4_K_M copies are made from the Q8_0 file by llama.cpp's
`llama-quantize`. Every file is written once and cached.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

from pagedllm.benchmarks.peers import BUILD_SCRIPT, llama_cpp_binary
from pagedllm.errors import InvalidArgumentError
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import cache_dir

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
ROPE_THETA = 500_000.0
CONTEXT_LENGTH = 8192
RMS_NORM_EPS = 1e-5
# Types the `gguf` writer produces itself, with the file type llama.cpp reports for them.
WRITTEN_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# Types made by llama-quantize, each from the written type named here.
LLAMA_QUANTIZED_TYPES: dict[str, str] = {"Q4_K_M": "Q8_0"}
FILE_TYPES = (*WRITTEN_TYPES, *LLAMA_QUANTIZED_TYPES)
QUANTIZE_TIMEOUT_S = 3600


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-family decoder; the vocabulary is the tokenizer's."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Llama 3.2 1B and 3B's decoder shapes.
SHAPES: dict[str, LlamaShape] = {
    "1b": LlamaShape(hidden_size=2048, num_layers=16, intermediate_size=8192, num_heads=32, num_kv_heads=8),
    "3b": LlamaShape(hidden_size=3072, num_layers=28, intermediate_size=8192, num_heads=24, num_kv_heads=8),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file: its GGUF name, its shape (rows, columns) and its weights' standard deviation."""

    name: str
    shape: tuple[int, ...]
    std: float  # 0: a norm weight, all ones


def tensor_specs(shape: LlamaShape, vocab_size: int) -> list[TensorSpec]:
    """The tensors of a Llama with tied embeddings, drawn so every layer's output has a unit-scale RMS.

    Projections use std 1/√fan_in; the two that feed the residual stream are further shrunk by √(2·layers), so the
    stream grows by O(1) over the whole depth. The embedding table (also the output layer) uses 1/√hidden, which
    gives logits of unit scale from the final norm's output. Q and K rows are random, so they need no permuting
    into llama.cpp's interleaved RoPE order: both engines read the same model from the file.
    """
    h, f = shape.hidden_size, shape.intermediate_size
    kv = shape.num_kv_heads * shape.head_dim
    residual = math.sqrt(2 * shape.num_layers)
    specs = [
        TensorSpec("token_embd.weight", (vocab_size, h), 1 / math.sqrt(h)),
        TensorSpec("output_norm.weight", (h,), 0),
    ]
    for layer in range(shape.num_layers):
        prefix = f"blk.{layer}."
        specs += [
            TensorSpec(prefix + "attn_norm.weight", (h,), 0),
            TensorSpec(prefix + "attn_q.weight", (h, h), 1 / math.sqrt(h)),
            TensorSpec(prefix + "attn_k.weight", (kv, h), 1 / math.sqrt(h)),
            TensorSpec(prefix + "attn_v.weight", (kv, h), 1 / math.sqrt(h)),
            TensorSpec(prefix + "attn_output.weight", (h, h), 1 / math.sqrt(h) / residual),
            TensorSpec(prefix + "ffn_norm.weight", (h,), 0),
            TensorSpec(prefix + "ffn_gate.weight", (f, h), 1 / math.sqrt(h)),
            TensorSpec(prefix + "ffn_up.weight", (f, h), 1 / math.sqrt(h)),
            TensorSpec(prefix + "ffn_down.weight", (h, f), 1 / math.sqrt(f) / residual),
        ]
    return specs


def tensor_type(spec: TensorSpec, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norm weights stay float32, as llama.cpp's converter keeps them."""
    return Q.F32 if len(spec.shape) == 1 else qtype


def tensor_bytes(spec: TensorSpec, qtype: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(spec.shape) // block_size * type_size


def tensor_data(spec: TensorSpec, qtype: gguf.GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """The tensor's bytes in the file's layout (quantized by `gguf` where the type is quantized)."""
    if spec.std == 0:
        return np.ones(spec.shape, dtype=np.float32)
    weights = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(spec.std)
    if qtype == Q.F16:
        return weights.astype(np.float16)
    return gguf.quants.quantize(weights, qtype)


@cache
def tokenizer_fields(source: Path) -> list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """(key, value, type, array item type) of every tokenizer.* field of a GGUF file."""
    fields = []
    for key, field in gguf.GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), field.types[0], sub_type))
    return fields


def write_synthetic_gguf(path: Path, shape: LlamaShape, type_name: str, seed: int = 0) -> None:
    """Write a random-weight Llama of `shape` in one of WRITTEN_TYPES, with the embedded model's tokenizer."""
    qtype, file_type = WRITTEN_TYPES[type_name]
    tokenizer_source = resolve_model_path(None)
    fields = tokenizer_fields(tokenizer_source)
    vocab_size = len(next(value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"))
    specs = tensor_specs(shape, vocab_size)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(f"pagedllm synthetic llama {path.stem}")
    writer.add_file_type(file_type)
    writer.add_block_count(shape.num_layers)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_heads)
    writer.add_head_count_kv(shape.num_kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_vocab_size(vocab_size)
    for key, value, value_type, sub_type in fields:
        writer.add_key_value(key, value, value_type, sub_type)
    for spec in specs:
        kind = tensor_type(spec, qtype)
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), tensor_bytes(spec, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Tensors are drawn and written one at a time, in the order of their infos: memory stays at one tensor.
    for index, spec in enumerate(tqdm(specs, desc=f"Writing {path.name}", unit="tensor")):
        rng = np.random.default_rng([seed, index])
        writer.write_tensor_data(tensor_data(spec, tensor_type(spec, qtype), rng))
    writer.close()
    partial.replace(path)


def synthetic_dir() -> Path:
    return cache_dir() / "synth"


def synthetic_path(size: str, type_name: str, directory: Path | None = None) -> Path:
    return (directory or synthetic_dir()) / f"llama-{size}-{type_name.lower()}.gguf"


def synthetic_model(size: str, type_name: str, directory: Path | None = None, seed: int = 0) -> Path:
    """The cached synthetic model of a size and file type, written (or quantized by llama.cpp) on first use."""
    if size not in SHAPES:
        raise InvalidArgumentError(f"unknown size {size!r}: choose from {', '.join(SHAPES)}", "sizes")
    if type_name not in FILE_TYPES:
        raise InvalidArgumentError(f"unknown type {type_name!r}: choose from {', '.join(FILE_TYPES)}", "types")
    path = synthetic_path(size, type_name, directory)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if type_name in WRITTEN_TYPES:
        write_synthetic_gguf(path, SHAPES[size], type_name, seed)
    else:
        source = synthetic_model(size, LLAMA_QUANTIZED_TYPES[type_name], directory, seed)
        llama_quantize(source, path, type_name)
    return path


def llama_quantize(source: Path, path: Path, type_name: str) -> None:
    """llama.cpp's llama-quantize from an already quantized file (allowed to requantize)."""
    partial = path.with_suffix(".partial")
    command = [str(llama_cpp_binary("llama-quantize")), "--allow-requantize", str(source), str(partial), type_name]
    logger.info("Running %s", " ".join(command))
    completed = subprocess.run(command, capture_output=True, text=True, timeout=QUANTIZE_TIMEOUT_S, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"llama-quantize failed with status {completed.returncode}:\n{completed.stderr[-4000:]}")
    partial.replace(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1b", help=f"comma list of sizes: {', '.join(SHAPES)}")
    parser.add_argument(
        "--types",
        default="Q4_0,Q8_0",
        help=f"comma list of file types: {', '.join(FILE_TYPES)} (Q4_K_M needs llama.cpp: {BUILD_SCRIPT})",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where the files go (default: ~/.cache/pagedllm/synth)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run(args: argparse.Namespace) -> int:
    for size in args.sizes.split(","):
        for type_name in args.types.split(","):
            print(synthetic_model(size.strip(), type_name.strip(), args.output_dir, args.seed))
    return 0
