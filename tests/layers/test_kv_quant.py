"""KV-cache quantization: the round-trip bound, the pools' reads, writes and copies, the allocator's capacity, and
an engine serving from an int8 or int4 cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm import LLM, SamplingParams
from pagedllm.config import ModelConfig
from pagedllm.engine.model_runner import kv_cache_bytes_per_block
from pagedllm.layers.attention import copy_blocks, gather_context, read_blocks
from pagedllm.layers.kv_quant import QuantizedKV, QuantizedKVPool, dequantize, pack_int4, quantize

BITS = [8, 4]


@st.composite
def rows(draw: st.DrawFn) -> torch.Tensor:
    """[..., head_dim] float32 rows: random at any magnitude, one-signed, constant or all zero."""
    leading = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    head_dim = draw(st.sampled_from([2, 4, 16, 64, 128]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(*leading, head_dim, generator=gen) * 10.0 ** draw(st.integers(-6, 4))
    kind = draw(st.sampled_from(["random", "positive", "negative", "constant", "zero"]))
    if kind == "positive":
        x = x.abs() + x.abs().max()
    elif kind == "negative":
        x = -x.abs()
    elif kind == "constant":
        x = x[..., :1].expand_as(x).contiguous()
    elif kind == "zero":
        x = torch.zeros_like(x)
    return x


@settings(max_examples=200, deadline=None)
@given(rows(), st.sampled_from(BITS))
def test_round_trip_is_within_half_a_step_per_token_head(x: torch.Tensor, bits: int) -> None:
    entries = quantize(x, bits)
    assert entries.codes.shape == (*x.shape[:-1], x.shape[-1] * bits // 8)
    assert entries.scales.shape == entries.zeros.shape == x.shape[:-1]
    assert entries.scales.dtype == torch.float16 and entries.zeros.dtype == torch.uint8
    assert int(entries.zeros.max()) <= 2**bits - 1
    scale = entries.scales.float().unsqueeze(-1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    error = (x - dequantize(entries, bits, torch.float32)).abs()
    # Half a quantization step, plus float32 rounding of x / scale (relative 2**-24 of up to 2**bits steps).
    assert (error <= scale * (0.5 + 2**bits * 2**-22)).all()


@given(st.integers(1, 32), st.sampled_from(BITS), st.integers(0, 2**31))
def test_dequantize_is_codes_minus_zero_times_scale(half: int, bits: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, 2, 2 * half), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 2**bits, (3, 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(3, 2, generator=gen).half()
    stored = pack_int4(codes) if bits == 4 else codes
    assert stored.shape[-1] == 2 * half * bits // 8
    if bits == 4:  # the first half of a row in the low nibbles, the second in the high ones
        assert torch.equal(stored & 0x0F, codes[..., :half]) and torch.equal(stored >> 4, codes[..., half:])
    expected = (codes.double() - zeros.double()[..., None]) * scales.double()[..., None]
    values = dequantize(QuantizedKV(stored, scales, zeros), bits, torch.float32)
    torch.testing.assert_close(values.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_pool_reads_back_what_it_stored_and_copies_blocks_whole(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    pool = QuantizedKVPool(6, 4, 2, 8, bits, torch.float32, torch.device("cpu"))
    assert pool.shape == (6, 4, 2, 8)
    x = torch.randn(24, 2, 8, generator=gen)
    slots = torch.randperm(24, generator=gen)
    pool.write(x, slots)
    stored = dequantize(quantize(x, bits), bits, torch.float32)
    by_slot = torch.empty_like(stored)
    by_slot[slots] = stored
    assert torch.equal(read_blocks(pool, torch.arange(6)).flatten(0, 1), by_slot)
    assert torch.equal(gather_context(pool, torch.tensor([2, 0]), 6), by_slot[[8, 9, 10, 11, 0, 1]])

    copy_blocks(pool, torch.tensor([1, 3]), torch.tensor([4, 5]))
    for tensor in pool.tensors():
        assert torch.equal(tensor[[4, 5]], tensor[[1, 3]])
    assert torch.equal(read_blocks(pool, torch.tensor([4, 5])), by_slot.view(6, 4, 2, 8)[[1, 3]])


def test_odd_int4_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        QuantizedKVPool(1, 1, 1, 3, 4, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def head_dim_64_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny random Llama whose heads are as wide as SmolLM2's (64), the width the capacity targets are for."""
    folder = tmp_path_factory.mktemp("tiny-head-dim-64")
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def cache_bytes(llm: LLM) -> int:
    """Bytes of every tensor the runner allocated for the KV cache."""
    runner = llm.engine.runner
    tensors = [
        t for pool in (*runner.k_caches, *runner.v_caches)
        for t in (pool.tensors() if isinstance(pool, QuantizedKVPool) else (pool,))
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_quantized_caches_hold_about_two_and_four_times_the_tokens(head_dim_64_dir: Path) -> None:
    budget = 2**20
    engines = {
        kv: LLM(model=str(head_dim_64_dir), dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory=budget)
        for kv in ("auto", "int8", "int4")
    }
    for kv, llm in engines.items():
        assert llm.engine.model_config.head_dim == 64
        assert cache_bytes(llm) == llm.engine.num_blocks * llm.engine.runner.bytes_per_block <= budget, kv
    assert engines["auto"].engine.runner.k_caches[0].dtype == torch.bfloat16
    blocks = {kv: llm.engine.num_blocks for kv, llm in engines.items()}
    assert blocks["int8"] >= 1.9 * blocks["auto"]
    assert blocks["int4"] >= 3.5 * blocks["auto"]


def test_bytes_per_block_count_scales_and_zero_points() -> None:
    mc = ModelConfig("llama", 10, 576, 1536, 30, 9, 3, 64, 8192, 1e-5, 1e5)
    # Per layer, token and kv head: 64 (int8) or 32 (int4) code bytes, a float16 scale and a uint8 zero point.
    assert kv_cache_bytes_per_block(mc, 16, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2
    assert kv_cache_bytes_per_block(mc, 16, torch.bfloat16, "int8") == 2 * 30 * 16 * 3 * 67
    assert kv_cache_bytes_per_block(mc, 16, torch.bfloat16, "int4") == 2 * 30 * 16 * 3 * 35


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_preemption_prefix_sharing_and_forks_keep_outputs_unchanged(tiny_llama_dir: Path, kv_cache_dtype: str) -> None:
    shared = list(range(1000, 1040))  # two and a half blocks every prompt starts with
    prompts = [shared + [2000 + i] * (3 + 2 * i) for i in range(5)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, n=2)
    roomy = LLM(model=str(tiny_llama_dir), kv_cache_dtype=kv_cache_dtype, kv_cache_memory=2**22,
                enable_prefix_caching=False)
    per_block = roomy.engine.runner.bytes_per_block
    tight = LLM(model=str(tiny_llama_dir), kv_cache_dtype=kv_cache_dtype, kv_cache_memory=14 * per_block,
                max_num_batched_tokens=32, max_num_seqs=6)
    expected = roomy.generate(prompts, params)
    outputs = tight.generate(prompts, params)
    engine = tight.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().prefix_cache_hit_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    for output, reference in zip(outputs, expected):
        assert [o.token_ids for o in output.outputs] == [o.token_ids for o in reference.outputs]


@pytest.mark.reference
def test_int8_cache_keeps_the_embedded_models_greedy_output(llm: LLM) -> None:
    prompts = [
        "The capital of France is",
        "Write a haiku about the sea.",
        "List three primary colors:",
        "def fibonacci(n):",
        "Explain why the sky is blue in one sentence.",
    ]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=5)
    quantized = LLM(kv_cache_dtype="int8", kv_cache_memory=2**26).generate(prompts, params)
    unquantized = llm.generate(prompts, params)
    same = 0
    for prompt, q, u in zip(prompts, quantized, unquantized):
        ours, theirs = q.outputs[0], u.outputs[0]
        if ours.token_ids == theirs.token_ids:
            same += 1
            continue
        # Where the two part, the unquantized model was all but tied between the two tokens: within twice the
        # largest shift int8 KV was measured to cause in a prompt token's logprob (0.13).
        at = next(i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b)
        tops = theirs.logprobs[at]
        assert ours.token_ids[at] in tops, f"{prompt!r}: token {at} not in the unquantized top-5"
        assert tops[theirs.token_ids[at]] - tops[ours.token_ids[at]] < 0.25, f"{prompt!r}: token {at} was no near tie"
    # Measured: 3 of 5 unchanged over 24 tokens; the other two part at near ties (gaps of 0.14 nats and less).
    assert same >= 3, f"{same} of {len(prompts)} greedy outputs unchanged"
