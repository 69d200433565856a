"""KV-cache quantization: the round-trip bound, the Hadamard rotation, the pools' reads, writes and copies, attention
over a quantized pool against an unquantized one, the allocator's capacity, and an engine serving from an int8 or
int4 cache."""

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
from pagedllm.layers.attention import (
    AttentionMetadata,
    PagedAttention,
    copy_blocks,
    gather_context,
    read_blocks,
    write_kv,
)
from pagedllm.layers.kv_quant import QuantizedKV, QuantizedKVPool, dequantize, hadamard, pack_int4, quantize

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
    assert pool.rotation is not None and torch.equal(pool.rotation, hadamard(8))
    x = torch.randn(24, 2, 8, generator=gen)
    slots = torch.randperm(24, generator=gen)
    pool.write(x, slots)
    # Read back in the rotated basis the pool stores.
    stored = dequantize(quantize(x @ hadamard(8), bits), bits, torch.float32)
    by_slot = torch.empty_like(stored)
    by_slot[slots] = stored
    assert torch.equal(read_blocks(pool, torch.arange(6)).flatten(0, 1), by_slot)
    assert torch.equal(gather_context(pool, torch.tensor([2, 0]), 6), by_slot[[8, 9, 10, 11, 0, 1]])

    copy_blocks(pool, torch.tensor([1, 3]), torch.tensor([4, 5]))
    for tensor in pool.tensors():
        assert torch.equal(tensor[[4, 5]], tensor[[1, 3]])
    assert torch.equal(read_blocks(pool, torch.tensor([4, 5])), by_slot.view(6, 4, 2, 8)[[1, 3]])


@given(st.integers(0, 8), st.integers(0, 2**31))
def test_hadamard_is_orthonormal_symmetric_and_its_own_inverse(log_n: int, seed: int) -> None:
    n = 2**log_n
    h = hadamard(n)
    assert h.shape == (n, n) and torch.equal(h, h.T)
    assert torch.equal(h.abs(), torch.full((n, n), n**-0.5))
    torch.testing.assert_close(h @ h, torch.eye(n), atol=1e-6, rtol=0)
    x = torch.randn(5, 3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(x @ h.double() @ h.double(), x)


@pytest.mark.parametrize("n", [0, 3, 6, 96])
def test_hadamard_needs_a_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(n)


@given(st.sampled_from([(4, 4), (4, 2), (6, 3), (8, 1)]), st.sampled_from([4, 16, 64]), st.integers(0, 2**31))
def test_attention_on_rotated_qkv_equals_attention_without_once_unrotated(
    heads: tuple[int, int], head_dim: int, seed: int
) -> None:
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, num_heads, 7, head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, num_kv_heads, 7, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    h = hadamard(head_dim).double()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch.testing.assert_close(attend(q @ h, k @ h, v @ h) @ h, attend(q, k, v))


@settings(max_examples=100, deadline=None)
@given(rows(), st.sampled_from(BITS))
def test_pool_round_trip_error_is_within_half_a_step_in_the_original_basis(x: torch.Tensor, bits: int) -> None:
    # The rotation is orthonormal: a row's L2 error back in x's basis is its error in the stored basis, where each
    # of its head_dim values is within half a step.
    head_dim = x.shape[-1]
    pool = QuantizedKVPool(1, x[..., 0].numel(), 1, head_dim, bits, torch.float32, torch.device("cpu"))
    flat = x.reshape(-1, 1, head_dim)
    pool.write(flat, torch.arange(flat.shape[0]))
    back = pool.rotate(read_blocks(pool, torch.tensor([0])).reshape(flat.shape))
    error = (back - flat).double().norm(dim=-1)
    scale = pool.scales.reshape(-1, 1).double()
    # Float32 rounding in the two products by H, relative to each row's norm.
    assert (error <= scale * head_dim**0.5 * (0.5 + 2**bits * 2**-22) + flat.double().norm(dim=-1) * 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_rotation_shrinks_the_round_trip_error_of_rows_with_an_outlier_channel(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(256, 64, generator=gen)
    x[:, 7] += 20.0  # one channel far outside the others, as RoPE'd keys have
    h = hadamard(64)
    plain = dequantize(quantize(x, bits), bits, torch.float32) - x
    rotated = dequantize(quantize(x @ h, bits), bits, torch.float32) @ h - x
    # Measured: 0.41 of the unrotated error at either width (the outlier no longer sets the range alone).
    assert rotated.norm() < 0.5 * plain.norm()


def test_a_head_dim_that_is_not_a_power_of_two_is_stored_unrotated() -> None:
    pool = QuantizedKVPool(2, 4, 2, 6, 8, torch.float32, torch.device("cpu"))
    assert pool.rotation is None
    x = torch.randn(8, 2, 6, generator=torch.Generator().manual_seed(0))
    assert pool.rotate(x) is x
    pool.write(x, torch.arange(8))
    assert torch.equal(read_blocks(pool, torch.arange(2)).flatten(0, 1), dequantize(quantize(x, 8), 8, torch.float32))


# Relative (Frobenius) error of the attention output over standard-normal q, k, v, head_dim 64: one quantization
# step is about range / (2**bits - 1) with range about 5 standard deviations, an rms error of step / sqrt(12), i.e.
# 0.6% (int8) and 10% (int4) of a value; the bound is about twice that. Measured: 0.6% and 11%.
ATTENTION_TOLERANCE = {8: 0.015, 4: 0.2}


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("bits", BITS)
def test_quantized_pool_attention_matches_unquantized_pool_attention(impl: str, bits: int) -> None:
    num_heads, num_kv_heads, head_dim, block_size = 6, 3, 64, 16
    gen = torch.Generator().manual_seed(bits)
    seqs = [(40, 1), (33, 1), (20, 6), (24, 24)]  # (context after the step, new tokens): decodes, a chunk, a prefill
    num_blocks = sum(-(-ctx // block_size) for ctx, _ in seqs)
    tables, slots, at = [], [], 0
    for ctx, _ in seqs:
        tables.append(list(range(at, at + -(-ctx // block_size))))
        slots.append(torch.arange(ctx) + at * block_size)
        at += len(tables[-1])
    contexts = [[torch.randn(ctx, num_kv_heads, head_dim, generator=gen) for _ in "kv"] for ctx, _ in seqs]
    q = torch.randn(sum(new for _, new in seqs), num_heads, head_dim, generator=gen)
    meta = AttentionMetadata.build(
        torch.cat([s[ctx - new :] for s, (ctx, new) in zip(slots, seqs)]).tolist(),
        tables,
        [new for _, new in seqs],
        [ctx for ctx, _ in seqs],
        block_size,
        torch.device("cpu"),
    )
    outputs = {}
    for kind in ("unquantized", "quantized"):
        attention = PagedAttention(num_heads, num_kv_heads, head_dim, impl)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        if kind == "unquantized":
            pools = [torch.zeros(shape) for _ in range(2)]
        else:
            pools = [QuantizedKVPool(*shape, bits, torch.float32, torch.device("cpu")) for _ in range(2)]
        attention.bind_pools(*pools)
        for (k, v), s, (ctx, new) in zip(contexts, slots, seqs):  # the context cached before this step
            write_kv(*pools, k[: ctx - new], v[: ctx - new], s[: ctx - new])
        new_k = torch.cat([k[ctx - new :] for (k, _), (ctx, new) in zip(contexts, seqs)])
        new_v = torch.cat([v[ctx - new :] for (_, v), (ctx, new) in zip(contexts, seqs)])
        outputs[kind] = attention(q, new_k, new_v, meta)
    relative = (outputs["quantized"] - outputs["unquantized"]).norm() / outputs["unquantized"].norm()
    assert relative <= ATTENTION_TOLERANCE[bits]


def test_odd_int4_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        QuantizedKVPool(1, 1, 1, 3, 4, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def head_dim_64_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A tiny random Llama whose heads are as wide as SmolLM2's (64), the width the capacity targets are for."""
    folder = tmp_path_factory.mktemp("tiny-head-dim-64")
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def cache_bytes(llm: LLM) -> int:
    """Bytes of every tensor the runner allocated for the KV cache."""
    runner = llm.engine.runner
    tensors = [
        t
        for pool in (*runner.k_pools, *runner.v_pools)
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
    assert engines["auto"].engine.runner.k_pools[0].dtype == torch.bfloat16
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
    roomy = LLM(
        model=str(tiny_llama_dir), kv_cache_dtype=kv_cache_dtype, kv_cache_memory=2**22, enable_prefix_caching=False
    )
    per_block = roomy.engine.runner.bytes_per_block
    tight = LLM(
        model=str(tiny_llama_dir),
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory=14 * per_block,
        max_num_batched_tokens=32,
        max_num_seqs=6,
    )
    expected = roomy.generate(prompts, params)
    outputs = tight.generate(prompts, params)
    engine = tight.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().prefix_cache_hit_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    for output, reference in zip(outputs, expected):
        assert [o.token_ids for o in output.outputs] == [o.token_ids for o in reference.outputs]


GREEDY_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three primary colors:",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Name the largest planet in the solar system.",
    "Give me a tip for writing clean code.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "What does a CPU do?",
]


@pytest.mark.slow  # test_preemption_prefix_sharing_and_forks_keep_outputs_unchanged keeps int8 caches by default
@pytest.mark.reference
def test_int8_weights_and_int8_cache_keep_most_greedy_outputs() -> None:
    """W8A16 weights with an int8 KV cache against the unquantized bfloat16 model, 12 greedy tokens a prompt."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
    unquantized = LLM(quantization="none", kv_cache_memory=2**26).generate(GREEDY_PROMPTS, params)
    quantized = LLM(quantization="int8", kv_cache_dtype="int8", dense_matmul_min_rows=0, kv_cache_memory=2**26)
    outputs = quantized.generate(GREEDY_PROMPTS, params)
    same = 0
    for prompt, q, u in zip(GREEDY_PROMPTS, outputs, unquantized):
        ours, theirs = q.outputs[0], u.outputs[0]
        if ours.token_ids == theirs.token_ids:
            same += 1
            continue
        # Where the two part, the unquantized model was close to a tie between the two tokens.
        at = next(i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b)
        tops = theirs.logprobs[at]
        assert ours.token_ids[at] in tops, f"{prompt!r}: token {at} not in the unquantized top-5"
        assert tops[theirs.token_ids[at]] - tops[ours.token_ids[at]] < 0.5, f"{prompt!r}: token {at} was no near tie"
    # Measured: 10 of 12 unchanged over 12 tokens (5 of 12 over 24); every parting is at a gap of 0.25 nats or less.
    assert same >= 8, f"{same} of {len(GREEDY_PROMPTS)} greedy outputs unchanged"
