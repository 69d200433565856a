"""Quantized weights from GGUF blocks and from quantize-on-load, through the loader, the model and the engine."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from pagedllm import LLM
from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.gguf_linear import GGUFEmbedding, GGUFLinear
from pagedllm.layers.linear import Linear, QuantizedLinear, kernel_representable
from pagedllm.layers.q8_0_tiles import Q8_0Embedding, Q8_0Linear
from pagedllm.layers.quantization import Int4Weight, LinearQuantization, dequantize
from pagedllm.model.lazy_weights import LazyWeights
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import gguf_linear_weight, load_checkpoint
from tests.model.test_gguf_loader import CONFIG, gguf_tensors, write_gguf
from tests.reference import paged_last_logits

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_gguf_tensors() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(CONFIG)
    return gguf_tensors({name: t.detach().float().numpy() for name, t in model.state_dict().items()})


def is_linear(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_raw_blocks_decode_to_what_gguf_dequantizes(
    qtype: gguf.GGMLQuantizationType, tiny_gguf_tensors, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_gguf_tensors, qtype)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.tensor_type != qtype:
            continue
        quantized = gguf_linear_weight(tensor)
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype))
        if qtype == Q.Q8_0:
            # Kept as the file's own blocks, bit for bit.
            assert isinstance(quantized, GGUFWeight) and quantized.ggml_type == qtype
            assert torch.equal(quantized.blocks.flatten(), torch.from_numpy(np.array(tensor.data).reshape(-1)))
            assert torch.equal(dequantize(quantized), expected), tensor.name
        else:
            # Kept exactly as stored: same groups of 32, same nibble order, same scales and mins.
            assert isinstance(quantized, Int4Weight) and quantized.group_size == 32
            torch.testing.assert_close(dequantize(quantized), expected, rtol=0, atol=1e-6, msg=tensor.name)
            # The int4 kernel stores float16 scales and minimums, as the blocks do: the weights stay exact.
            assert torch.equal(dequantize(kernel_representable(quantized)), dequantize(quantized)), tensor.name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_kept_quantized_linears_match_the_dense_load_rows_unpermuted(
    qtype: gguf.GGMLQuantizationType, tiny_gguf_tensors, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_gguf_tensors, qtype)
    dense = load_checkpoint(path, torch.float32).weights
    kept = load_checkpoint(path, torch.float32, keep_quantized=True).weights
    assert set(kept) == set(dense)
    kind = GGUFWeight if qtype == Q.Q8_0 else Int4Weight
    for name, expected in dense.items():
        value = kept[name]
        if name == "model.embed_tokens.weight":
            # The lookup reads the table's own blocks (the file's bytes), whatever their type.
            assert isinstance(value, GGUFWeight) and value.ggml_type == qtype
            assert torch.equal(dequantize(value), expected)
            continue
        if not is_linear(name):
            assert isinstance(value, torch.Tensor) and torch.equal(value, expected), name
            continue
        assert isinstance(value, kind), name
        # The dense load undoes llama.cpp's Q/K row interleave; the quantized rows must follow the same order.
        assert ((dequantize(value) - expected).abs() <= 1e-6).all(), name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_a_tied_table_serves_lookup_and_lm_head_from_one_copy_of_its_blocks(
    qtype: gguf.GGMLQuantizationType, tiny_gguf_tensors, tmp_path: Path
) -> None:
    path = tmp_path / "tied.gguf"
    write_gguf(path, {k: v for k, v in tiny_gguf_tensors.items() if k != "output.weight"}, qtype)
    dense = load_checkpoint(path, torch.float32).weights["model.embed_tokens.weight"]
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    assert checkpoint.config.tie_word_embeddings
    table = checkpoint.weights["model.embed_tokens.weight"]
    assert isinstance(table, GGUFWeight) and checkpoint.weights["lm_head.weight"] is table
    assert torch.equal(dequantize(table), dense)

    model = LlamaForCausalLM(checkpoint.config, 64, quantization=LinearQuantization("auto"))
    model.load_weights(checkpoint.weights)
    if qtype == Q.Q8_0:  # rearranged into the tiles every row count multiplies by
        assert isinstance(model.lm_head, Q8_0Linear) and isinstance(model.embed_tokens, Q8_0Embedding)
        copies = [(model.lm_head.tiles, model.embed_tokens.tiles), (model.lm_head.scales, model.embed_tokens.scales)]
    else:
        assert isinstance(model.lm_head, GGUFLinear) and isinstance(model.embed_tokens, GGUFEmbedding)
        copies = [(model.lm_head.blocks, model.embed_tokens.blocks)]
    assert all(ours.data_ptr() == theirs.data_ptr() for ours, theirs in copies)  # one copy, counted once
    table_bytes = sum(ours.numel() * ours.element_size() for ours, _ in copies)
    assert table_bytes == dense.numel() * gguf.GGML_QUANT_SIZES[qtype][1] // 32
    token_ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    assert torch.equal(model.embed_tokens(token_ids), torch.nn.functional.embedding(token_ids, dense))
    hidden = torch.randn(2, CONFIG.hidden_size)
    expected = hidden @ dense.T
    assert (model.lm_head(hidden) - expected).norm() <= 2e-2 * expected.norm()  # int8-rounded activations


def test_auto_builds_int4_layers_from_q4_blocks_and_none_builds_dense_ones(tiny_gguf_tensors, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_gguf_tensors, Q.Q4_1)
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    auto = LlamaForCausalLM(checkpoint.config, 64, quantization=LinearQuantization("auto", dense_matmul_min_rows=0))
    auto.load_weights(checkpoint.weights)
    none = LlamaForCausalLM(checkpoint.config, 64, quantization=LinearQuantization("none"))
    none.load_weights(checkpoint.weights)
    for layer in (auto.layers[1].self_attn.qkv_proj, auto.layers[0].mlp.gate_up_proj, auto.layers[0].mlp.down_proj):
        assert isinstance(layer, QuantizedLinear) and (layer.bits, layer.group_size) == (4, 32)
        assert layer.dense is None  # dense_matmul_min_rows=0 keeps no dense copy
    dense_qkv = none.layers[1].self_attn.qkv_proj
    assert type(dense_qkv) is Linear
    # The fused int4 q/k/v computes what the dense load of the same blocks computes.
    x = torch.randn(1, CONFIG.hidden_size)
    reference = dense_qkv(x)
    assert (auto.layers[1].self_attn.qkv_proj(x) - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert auto.weight_bytes() < none.weight_bytes() / 4


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_on_load_keeps_the_tiny_models_logits(method: str, tiny_llama_dir: Path) -> None:
    dense = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=2**22, quantization="none")
    quantized = LLM(
        model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=2**22, quantization=method, dense_matmul_min_rows=0
    )
    assert not any(isinstance(m, QuantizedLinear) for m in dense.engine.runner.model.modules())
    layers = [m for m in quantized.engine.runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the lm_head
    assert {m.bits for m in layers} == ({8} if method == "int8" else {4, 8})
    table = dense.engine.runner.model.embed_tokens.weight
    table_bytes = table.numel() * table.element_size()  # the embedding lookup stays dense
    assert quantized.engine.weight_bytes - table_bytes < (dense.engine.weight_bytes - table_bytes) / 3
    assert quantized.engine.block_manager.prefix_cache.root != dense.engine.block_manager.prefix_cache.root
    token_ids = dense.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    ours = paged_last_logits(quantized.engine, token_ids, chunk_size=4)
    theirs = paged_last_logits(dense.engine, token_ids, chunk_size=4)
    similarity = torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item()
    assert similarity > (0.999 if method == "int8" else 0.98), similarity


def test_hf_folders_stay_dense_under_auto(tiny_llama_dir: Path) -> None:
    llm = LLM(model=str(tiny_llama_dir), kv_cache_memory=2**22)
    assert llm.engine.config.quantization == "auto"
    assert not any(isinstance(m, QuantizedLinear) for m in llm.engine.runner.model.modules())


@pytest.mark.reference
def test_auto_on_the_embedded_model_keeps_its_logits(llm: LLM) -> None:
    from tests.model.test_parity import LOGIT_PROMPTS

    auto = LLM(kv_cache_memory=2**26)
    model = auto.engine.runner.model
    assert isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)
    decoder = [m for m in model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(decoder) == 4 * len(model.layers) and {(m.bits, m.group_size) for m in decoder} == {(4, 32)}
    assert isinstance(model.lm_head, Q8_0Linear) and isinstance(model.embed_tokens, Q8_0Embedding)
    assert auto.engine.weight_bytes < llm.engine.weight_bytes * 1.5  # int4, Q8_0 tiles, the float32 dense copies
    for prompt in LOGIT_PROMPTS:
        token_ids = auto.tokenizer.encode(prompt)
        ours = paged_last_logits(auto.engine, token_ids, chunk_size=7)
        dense = paged_last_logits(llm.engine, token_ids, chunk_size=7)
        # The int8-rounded activations of the int4 layers and the Q8_0 lm_head move logits; the top token never.
        assert (ours - dense).abs().max().item() < 1.5, prompt
        assert ours.argmax().item() == dense.argmax().item(), prompt
        assert torch.nn.functional.cosine_similarity(ours, dense, dim=0).item() > 0.995, prompt


def test_a_gguf_model_loads_one_converted_weight_at_a_time(tiny_gguf_tensors, tmp_path: Path) -> None:
    # Q4_0 linears are read as Int4Weight (a byte per value, twice the file's size) and packed by their layers:
    # while the model loads, at most the projections of one fused layer (q, k before v) may be alive at once.
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_gguf_tensors, Q.Q4_0)
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    assert isinstance(checkpoint.weights, LazyWeights)
    read: list[weakref.ref[Int4Weight]] = []
    alive_at_each_read: list[int] = []

    def tracked(name: str) -> Callable[[], object]:
        def read_weight() -> object:
            weight = checkpoint.weights[name]
            if isinstance(weight, Int4Weight):
                alive_at_each_read.append(sum(ref() is not None for ref in read))
                read.append(weakref.ref(weight))
            return weight

        return read_weight

    weights = LazyWeights({name: tracked(name) for name in checkpoint.weights})
    model = LlamaForCausalLM(checkpoint.config, 64, quantization=LinearQuantization("auto"))
    model.load_weights(weights)
    assert len(alive_at_each_read) == 7 * CONFIG.num_hidden_layers + 1  # every projection, and the lm_head
    assert max(alive_at_each_read) == 2
    assert all(ref() is None for ref in read)  # the layers keep their own packed tiles
