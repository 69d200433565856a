"""Synthetic random-weight Llama GGUFs: the file's types and shapes, the tokenizer copied, and pagedllm runs them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.synthetic import (
    SHAPES,
    LlamaShape,
    synthetic_model,
    synthetic_path,
    tensor_specs,
    tokenizer_fields,
    write_synthetic_gguf,
)
from pagedllm.errors import InvalidArgumentError
from pagedllm.model.registry import resolve_model_path

Q = gguf.GGMLQuantizationType
TINY = LlamaShape(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2)
VOCAB = 49152


@dataclass(frozen=True)
class TinyFile:
    type_name: str
    path: Path
    reader: gguf.GGUFReader  # read once: parsing the vocabulary takes seconds


@pytest.fixture(scope="module", params=["Q4_0", "Q8_0"])
def tiny_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyFile:
    path = tmp_path_factory.mktemp("synth") / f"tiny-{request.param}.gguf"
    write_synthetic_gguf(path, TINY, request.param)
    return TinyFile(request.param, path, gguf.GGUFReader(str(path)))


def test_file_holds_the_shapes_and_types_asked(tiny_file: TinyFile) -> None:
    reader = tiny_file.reader
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * TINY.num_layers and "output.weight" not in tensors  # tied embeddings
    expected_shapes = {
        "token_embd.weight": (VOCAB, 64),
        "blk.1.attn_q.weight": (64, 64),
        "blk.1.attn_k.weight": (32, 64),  # 2 KV heads of 16
        "blk.1.ffn_gate.weight": (128, 64),
        "blk.1.ffn_down.weight": (64, 128),
        "blk.0.attn_norm.weight": (64,),
    }
    for name, shape in expected_shapes.items():
        assert tuple(int(d) for d in reversed(tensors[name].shape)) == shape, name
    for name, tensor in tensors.items():
        expected = Q.F32 if name.endswith("norm.weight") else Q[tiny_file.type_name]
        assert tensor.tensor_type == expected, name
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    embedded = {key: value for key, value, _, _ in tokenizer_fields(resolve_model_path(None))}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert reader.fields[key].contents() == embedded[key], key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert reader.fields[key].contents(-1) == embedded[key][-1], key
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(embedded["tokenizer.ggml.tokens"]) == VOCAB


def test_weights_follow_the_scaled_init(tiny_file: TinyFile) -> None:
    tensors = {t.name: t for t in tiny_file.reader.tensors}
    for spec in tensor_specs(TINY, VOCAB):
        values = gguf.quants.dequantize(tensors[spec.name].data, tensors[spec.name].tensor_type)
        if spec.std == 0:
            assert np.all(values == 1), spec.name
        else:
            assert float(values.std()) == pytest.approx(spec.std, rel=0.15), spec.name
    residual = tensor_specs(TINY, VOCAB)[6]  # blk.0.attn_output: 1/√hidden shrunk by √(2·layers)
    assert residual.name == "blk.0.attn_output.weight" and residual.std == pytest.approx(1 / 8 / 2)


def test_pagedllm_loads_and_generates_finite_logprobs(tiny_file: TinyFile) -> None:
    llm = LLM(str(tiny_file.path), kv_cache_memory=2**24)
    config = llm.engine.model_config
    assert (config.hidden_size, config.num_layers, config.num_kv_heads, config.vocab_size) == (64, 2, 2, VOCAB)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    output = llm.generate(["Hello, how are"], params)[0].outputs[0]
    assert len(output.token_ids) == 6
    assert all(math.isfinite(value) for entry in output.logprobs for value in entry.values())


def test_cached_file_is_reused_and_bad_names_are_clear_errors(tmp_path: Path) -> None:
    path = synthetic_path("1b", "Q4_0", tmp_path)
    path.write_bytes(b"cached")  # synthetic_model must not rewrite a file that exists
    assert synthetic_model("1b", "Q4_0", tmp_path) == path and path.read_bytes() == b"cached"
    with pytest.raises(InvalidArgumentError, match="unknown size"):
        synthetic_model("7b", "Q4_0", tmp_path)
    with pytest.raises(InvalidArgumentError, match="unknown type"):
        synthetic_model("1b", "Q2_K", tmp_path)
    assert SHAPES["1b"].head_dim == 64 and SHAPES["3b"].head_dim == 128
