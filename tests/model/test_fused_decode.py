"""The one-call decode of every layer (FusedDecode) against the layers' own forward, on dense, int8, int4 and
biased models; and the models and steps it must leave to the layers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pagedllm import LLM
from pagedllm.cpu import native_bfloat16_matmul
from pagedllm.engine.block_manager import BlockManager
from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.attention import AttentionMetadata
from pagedllm.layers.linear import dense_rows
from pagedllm.model.llama import LlamaForCausalLM
from tests.checkpoints import write_checkpoint

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the fused decode is a CPU kernel")

PROMPT_LENS = (5, 20, 37)  # one, two and three blocks of 16


def prefill(model: LlamaForCausalLM, blocks: BlockManager, lengths: tuple[int, ...]) -> list[SimpleNamespace]:
    """Sequences of random tokens with their prompts' K/V in the cache, through the layers (a prefill step)."""
    generator = torch.Generator().manual_seed(0)
    seqs = []
    for length in lengths:
        seq = SimpleNamespace(block_ids=[], group_block_ids=[], num_computed_tokens=0, num_evicted_tokens=0)
        blocks.allocate_slots(seq, length)
        meta = AttentionMetadata.build(
            [blocks.slot(seq, p) for p in range(length)],
            [seq.block_ids],
            [length],
            [length],
            blocks.block_size,
            torch.device("cpu"),
        )
        model(torch.randint(0, model.config.vocab_size, (length,), generator=generator), torch.arange(length), meta)
        seq.num_computed_tokens = length
        seqs.append(seq)
    return seqs


def decode_step(blocks: BlockManager, seqs: list[SimpleNamespace]) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and metadata of one new token per sequence."""
    for seq in seqs:
        blocks.allocate_slots(seq, 1)
    positions = [seq.num_computed_tokens for seq in seqs]
    meta = AttentionMetadata.build(
        [blocks.slot(seq, p) for seq, p in zip(seqs, positions)],
        [seq.block_ids for seq in seqs],
        [1] * len(seqs),
        [p + 1 for p in positions],
        blocks.block_size,
        torch.device("cpu"),
    )
    return torch.tensor(positions), meta


def test_sliding_window_layers_are_left_to_the_layers(tiny_dirs: dict[str, Path]) -> None:
    # The kernel attends whole contexts; Mistral's window is honoured by the layers' attention.
    llm = LLM(str(tiny_dirs["mistral-mqa"]), kv_cache_memory=2**24)
    assert llm.engine.model_config.sliding_window is not None
    assert llm.engine.runner.fused_decode is None


@torch.inference_mode()
def check_stack_matches_layers(engine_llm: LLM, steps: int = 3, prompt_lens: tuple[int, ...] = PROMPT_LENS) -> None:
    engine = engine_llm.engine
    model, stack, blocks = engine.runner.model, engine.runner.fused_decode, engine.block_manager
    assert stack is not None
    seqs = prefill(model, blocks, prompt_lens)
    generator = torch.Generator().manual_seed(1)
    try:
        for _ in range(steps):
            positions, meta = decode_step(blocks, seqs)
            ids = torch.randint(0, model.config.vocab_size, (len(seqs),), generator=generator)
            assert stack.takes(meta)
            fused = stack.forward(model.embed_tokens(ids), positions, meta)
            pools = [pool.clone() for pool in stack.k_pools + stack.v_pools]
            # The layers write the same K/V to the same slots again, and must compute the same hidden states.
            torch.testing.assert_close(model(ids, positions, meta), fused, rtol=0, atol=0)
            for pool, after in zip(pools, stack.k_pools + stack.v_pools):
                assert torch.equal(pool, after)
            for seq in seqs:
                seq.num_computed_tokens += 1
    finally:
        for seq in seqs:
            blocks.free(seq)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    folders = {}
    for name in ("llama-gqa", "qwen2-gqa-bias", "mistral-mqa"):
        folders[name] = tmp_path_factory.mktemp(name)
        write_checkpoint(name, folders[name], tokenizer_dir, vocab_size=512)
    return folders


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-bias"])
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_stack_matches_layers_on_tiny_models(tiny_dirs: dict[str, Path], name: str, quantization: str) -> None:
    check_stack_matches_layers(LLM(str(tiny_dirs[name]), quantization=quantization, kv_cache_memory=2**24))


def test_stack_pads_dense_matmuls_as_the_layers_do(tiny_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_dirs["llama-gqa"]), quantization="none", dtype="bfloat16", kv_cache_memory=2**24)
    prompt_lens = tuple(range(3, 36, 3))  # 11 sequences: where bfloat16 matmuls run on oneDNN, padded to 16 rows
    weight = llm.engine.runner.fused_decode.weights[0]
    if native_bfloat16_matmul():
        assert dense_rows(torch.empty(len(prompt_lens), weight.shape[1], dtype=torch.bfloat16), weight) == 16
    check_stack_matches_layers(llm, prompt_lens=prompt_lens)


def test_stack_matches_layers_on_the_embedded_int4_model() -> None:
    """The GGUF's Q4_1 weights kept as int4 groups of 32, as `make serve` runs them."""
    llm = LLM(kv_cache_memory=2**26)
    assert {stacked for stacked in llm.engine.runner.fused_decode.group_sizes} == {32}
    check_stack_matches_layers(llm)


@pytest.mark.parametrize(
    "settings",
    [dict(kv_cache_dtype="int8"), dict(attention_impl="reference"), dict(fused_decode=False)],
    ids=["int8-kv", "reference-attention", "disabled"],
)
def test_models_the_stack_leaves_to_the_layers(tiny_dirs: dict[str, Path], settings: dict) -> None:
    llm = LLM(str(tiny_dirs["llama-gqa"]), kv_cache_memory=2**24, **settings)
    assert llm.engine.runner.fused_decode is None


@torch.inference_mode()
def test_steps_the_stack_leaves_to_the_layers(tiny_dirs: dict[str, Path]) -> None:
    """A step with a prefill in it, and one with more tokens than the int kernels' rows."""
    engine = LLM(str(tiny_dirs["llama-gqa"]), quantization="int8", kv_cache_memory=2**24).engine
    model, blocks = engine.runner.model, engine.block_manager
    seqs = prefill(model, blocks, PROMPT_LENS)
    _, meta = decode_step(blocks, seqs)
    stack = engine.runner.fused_decode
    assert stack.takes(meta)
    rows = int(stack.max_rows) + 1
    many = AttentionMetadata.build(list(range(rows)), [[0]] * rows, [1] * rows, [1] * rows, 16, torch.device("cpu"))
    assert not stack.takes(many)
    mixed = AttentionMetadata.build([0, 1, 2], [[0], [1]], [1, 2], [4, 2], blocks.block_size, torch.device("cpu"))
    assert not stack.takes(mixed)
