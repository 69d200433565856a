"""The one-call decode of every layer (FusedDecode) against the layers' own forward, on dense, int8, int4, GGUF
block and biased Llama-family models, on Gemma 3 (local and global layers past the window) and on tensor-parallel
ranks; and the models and steps it must leave to the layers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
from torch import nn

from pagedllm import LLM
from pagedllm.config import EngineConfig
from pagedllm.cpu import native_bfloat16_matmul
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.launch import spawn_ranks
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.model_runner import ModelRunner, attention_metadata
from pagedllm.engine.worker import Worker
from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.attention import AttentionMetadata, HeadGroups
from pagedllm.layers.gguf_linear import GGUF_PACKED_MATMUL_MAX_ROWS, GGUF_TILE_TYPES
from pagedllm.layers.kv_cache_groups import kv_cache_layout
from pagedllm.layers.linear import dense_rows
from pagedllm.layers.quantization import LinearQuantization
from pagedllm.model.fused_decode import FusedDecode, weight_kinds
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import load_checkpoint
from tests.checkpoints import write_checkpoint
from tests.model.test_gemma3 import write_tiny_gemma3
from tests.model.test_gguf_native_loading import LAYER_TYPES

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the fused decode is a CPU kernel")

PROMPT_LENS = (5, 20, 37)  # one, two and three blocks of 16
GEMMA3_WINDOW = 24  # the tiny Gemma 3's local layers see less than its longest prompt


def prefill(model: nn.Module, blocks: BlockManager, lengths: tuple[int, ...]) -> list[SimpleNamespace]:
    """Sequences of random tokens with their prompts' K/V in the cache, through the layers (a prefill step)."""
    generator = torch.Generator().manual_seed(0)
    seqs = []
    for length in lengths:
        seq = SimpleNamespace(block_ids=[], group_block_ids=[], num_computed_tokens=0, num_evicted_tokens=0)
        blocks.allocate_slots(seq, length)
        meta = attention_metadata(blocks, [(seq, 0, length)], torch.device("cpu"))
        model(torch.randint(0, model.config.vocab_size, (length,), generator=generator), torch.arange(length), meta)
        seq.num_computed_tokens = length
        seqs.append(seq)
    return seqs


def decode_step(blocks: BlockManager, seqs: list[SimpleNamespace]) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and metadata (every KV-cache group's) of one new token per sequence."""
    for seq in seqs:
        blocks.allocate_slots(seq, 1)
    positions = [seq.num_computed_tokens for seq in seqs]
    meta = attention_metadata(blocks, [(seq, p, p + 1) for seq, p in zip(seqs, positions)], torch.device("cpu"))
    return torch.tensor(positions), meta


@torch.inference_mode()
def check_stack_matches_layers(
    model: nn.Module,
    stack: FusedDecode | None,
    blocks: BlockManager,
    steps: int = 3,
    prompt_lens: tuple[int, ...] = PROMPT_LENS,
) -> None:
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


def check_llm_stack_matches_layers(llm: LLM, **kwargs) -> None:
    engine = llm.engine
    check_stack_matches_layers(engine.runner.model, engine.runner.fused_decode, engine.block_manager, **kwargs)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    folders = {}
    for name in ("llama-gqa", "qwen2-gqa-bias", "mistral-mqa"):
        folders[name] = tmp_path_factory.mktemp(name)
        # Mistral's window shorter than the longest prompt: its layers attend the window's last keys only.
        shape = dict(sliding_window=GEMMA3_WINDOW) if name == "mistral-mqa" else {}
        write_checkpoint(name, folders[name], tokenizer_dir, vocab_size=512, **shape)
    # SmolLM2's 9 query heads over 3 K/V heads, which 2 ranks split 4 and 5 (a K/V head on both).
    folders["llama-3-kv-heads"] = tmp_path_factory.mktemp("llama-3-kv-heads")
    shape = dict(hidden_size=288, num_attention_heads=9, num_key_value_heads=3, intermediate_size=192)
    write_checkpoint("llama-gqa", folders["llama-3-kv-heads"], tokenizer_dir, vocab_size=512, **shape)
    return folders


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa-bias"])
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_stack_matches_layers_on_tiny_models(tiny_dirs: dict[str, Path], name: str, quantization: str) -> None:
    check_llm_stack_matches_layers(LLM(str(tiny_dirs[name]), quantization=quantization, kv_cache_memory=2**24))


def test_stack_matches_sliding_window_layers(tiny_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_dirs["mistral-mqa"]), kv_cache_memory=2**24)
    assert llm.engine.runner.fused_decode.sliding_windows == [GEMMA3_WINDOW] * 2
    check_llm_stack_matches_layers(llm)


def gguf_runner(path: Path, dense_matmul_min_rows: int) -> tuple[ModelRunner, BlockManager]:
    """A runner over the GGUF's blocks kept as they are (quantization=auto), in float32."""
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    quantization = LinearQuantization("auto", dense_matmul_min_rows=dense_matmul_min_rows)
    model = LlamaForCausalLM(checkpoint.config, 256, quantization=quantization)
    model.load_weights(checkpoint.weights)
    config = EngineConfig(model=str(path), dtype="float32", dense_matmul_min_rows=dense_matmul_min_rows)
    return ModelRunner(model, config, 32, torch.device("cpu"), None), BlockManager(32, config.block_size)


def test_stack_matches_layers_on_gguf_blocks(mixed_gguf: Path) -> None:
    """Q5_K and Q5_0 blocks (Q4_K and Q6_K as K-quant tiles, Q8_0 as its tiles, Q4_0 and Q4_1 as int4), q/k/v and
    gate/up joined from parts of mixed types."""
    runner, blocks = gguf_runner(mixed_gguf, 0)
    stack = runner.fused_decode
    kinds = weight_kinds()
    gguf_types = {arg for kind, arg in zip(stack.kinds, stack.kind_args) if kind == kinds.gguf}
    tile_types = {arg for kind, arg in zip(stack.kinds, stack.kind_args) if kind == kinds.kquant_tiles}
    int4_types = {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1}
    q8_0_types = {gguf.GGMLQuantizationType.Q8_0}
    file_types = {t for types in LAYER_TYPES for t in types.values()}
    assert tile_types == set(GGUF_TILE_TYPES) and gguf_types == file_types - int4_types - tile_types - q8_0_types
    assert (kinds.int4, 32) in set(zip(stack.kinds, stack.kind_args)) and kinds.q8_0_tiles in stack.kinds
    assert stack.parts[0] == 3 and max(stack.parts) == 3  # layer 0's q/k/v: Q4_K, Q4_K, Q6_K
    assert stack.max_rows == GGUF_PACKED_MATMUL_MAX_ROWS
    check_stack_matches_layers(runner.model, stack, blocks)


@torch.inference_mode()
def test_gguf_dense_copies_leave_their_rows_to_the_layers(mixed_gguf: Path) -> None:
    """With dense copies from 2 rows on, the layers multiply a batch of 2 by them: the stack takes batch 1 only."""
    runner, blocks = gguf_runner(mixed_gguf, 2)
    stack = runner.fused_decode
    assert stack.max_rows == 1
    check_stack_matches_layers(runner.model, stack, blocks, prompt_lens=(37,))
    seqs = prefill(runner.model, blocks, (5, 20))
    assert not stack.takes(decode_step(blocks, seqs)[1])


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    write_tiny_gemma3(folder, tokenizer_dir, sliding_window=GEMMA3_WINDOW)
    return folder


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_stack_matches_gemma3_layers_past_the_window(tiny_gemma3_dir: Path, quantization: str) -> None:
    """Local and global layers, each KV-cache group's block tables, QK-norm, post-norms, GeGLU, scaled embeddings."""
    llm = LLM(str(tiny_gemma3_dir), quantization=quantization, kv_cache_memory=2**24)
    stack = llm.engine.runner.fused_decode
    layout = kv_cache_layout(llm.engine.model_config)
    assert stack.layer_type == "gemma3" and len(layout.groups) > 1
    assert stack.sliding_windows == [window or 0 for window in llm.engine.model_config.layer_sliding_windows()]
    assert set(stack.sliding_windows) == {0, GEMMA3_WINDOW}
    assert max(PROMPT_LENS) > GEMMA3_WINDOW
    check_llm_stack_matches_layers(llm)


def test_stack_pads_dense_matmuls_as_the_layers_do(tiny_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_dirs["llama-gqa"]), quantization="none", dtype="bfloat16", kv_cache_memory=2**24)
    prompt_lens = tuple(range(3, 36, 3))  # 11 sequences: where bfloat16 matmuls run on oneDNN, padded to 16 rows
    weight = llm.engine.runner.fused_decode.weights[0]
    if native_bfloat16_matmul():
        assert dense_rows(torch.empty(len(prompt_lens), weight.shape[1], dtype=torch.bfloat16), weight) == 16
    check_llm_stack_matches_layers(llm, prompt_lens=prompt_lens)


def test_stack_matches_layers_on_the_embedded_int4_model() -> None:
    """The GGUF's Q4_1 weights kept as int4 groups of 32, as `make serve` runs them."""
    llm = LLM(kv_cache_memory=2**26)
    stack = llm.engine.runner.fused_decode
    assert set(zip(stack.kinds, stack.kind_args)) == {(weight_kinds().int4, 32)}
    check_llm_stack_matches_layers(llm)


# Tensor-parallel cases: (model, quantization, each rank's query and K/V heads and HeadGroups).
TENSOR_RANK_CASES = (
    ("llama-gqa", "none", ((2, 1, HeadGroups(2, 0)), (2, 1, HeadGroups(2, 0)))),
    # SmolLM2's 9 query heads over 3 K/V heads: heads 0-3 and 4-8, K/V head 1 (query heads 3-5) on both ranks.
    ("llama-3-kv-heads", "none", ((4, 2, HeadGroups(3, 0)), (5, 2, HeadGroups(3, 1)))),
    ("llama-3-kv-heads", "int8", ((4, 2, HeadGroups(3, 0)), (5, 2, HeadGroups(3, 1)))),
    ("llama-3-kv-heads", "int4", ((4, 2, HeadGroups(3, 0)), (5, 2, HeadGroups(3, 1)))),
    # The one K/V head on both ranks, rank 1's query heads from the middle of its group.
    ("mistral-mqa", "none", ((2, 1, HeadGroups(4, 0)), (2, 1, HeadGroups(4, 2)))),
    ("qwen2-gqa-bias", "none", ((2, 1, HeadGroups(2, 0)), (2, 1, HeadGroups(2, 0)))),
    # Gemma 3's layers (local ones past their window), its one K/V head on both ranks.
    ("gemma3", "none", ((1, 1, HeadGroups(2, 0)), (1, 1, HeadGroups(2, 1)))),
    ("gemma3", "int8", ((1, 1, HeadGroups(2, 0)), (1, 1, HeadGroups(2, 1)))),
)


def _stack_matches_layers_on_rank(rank: int, world_size: int, folders: dict[str, Path]) -> None:
    for name, quantization, heads in TENSOR_RANK_CASES:
        config = EngineConfig(
            model=str(folders[name]), dtype="float32", quantization=quantization, tensor_parallel_size=world_size
        )
        group = ParallelGroup.create()
        try:
            worker = Worker(config, 64, 256, group, rank)
            stack = worker.runner.fused_decode
            assert stack is not None and stack.shared_memory is group.shared_memory is not None, name
            assert (stack.num_heads, stack.num_kv_heads, stack.groups) == heads[rank], name
            windows = kv_cache_layout(worker.model.config).sliding_windows
            blocks = BlockManager(64, config.block_size, sliding_windows=windows)
            check_stack_matches_layers(worker.model, stack, blocks)
        finally:
            group.close()


def test_stack_matches_layers_on_tensor_ranks(tiny_dirs: dict[str, Path], tiny_gemma3_dir: Path) -> None:
    """Each of 2 ranks decodes with its heads and channels, the row-parallel outputs summed through shared memory
    in the kernel, as its layers do: dense, int8, int4 and biased weights, whole groups of query heads, SmolLM2's
    9 query heads cut inside a group (a K/V head on both ranks), a replicated K/V head, Gemma 3's layers."""
    spawn_ranks(_stack_matches_layers_on_rank, 2, ({**tiny_dirs, "gemma3": tiny_gemma3_dir},), timeout_s=300)


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
