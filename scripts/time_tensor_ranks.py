"""Time each tensor-parallel rank's shard of a model alone, on one thread, for two head splits: whole K/V groups
per rank (SmolLM2 on 2 ranks: 3 and 6 query heads) and the even query-head split that head_shard makes (4 and 5).

A rank's collectives are skipped, so the times are its own compute: the slowest rank bounds a step. Every shard is
loaded in this one process and the shards are timed in turns, each turn's thread CPU time, the least kept (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import pagedllm.layers.parallel_linear as parallel_linear
from pagedllm.config import EngineConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.engine.model_runner import ModelRunner
from pagedllm.engine.worker import load_model
from pagedllm.layers.attention import AttentionMetadata, HeadGroups
from pagedllm.layers.parallel_linear import HeadShard, RowBlock, shard_units

QUERY_SPLIT = (parallel_linear.head_shard, parallel_linear.attention_blocks)
NUM_BLOCKS = 64


def kv_group_shard(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Whole K/V heads with all their query heads (num_kv_heads >= world_size)."""
    kv_heads = shard_units(num_kv_heads, rank, world_size)
    size = num_heads // num_kv_heads
    return HeadShard(range(kv_heads.start * size, kv_heads.stop * size), kv_heads, HeadGroups(size))


def kv_group_blocks(num_heads: int, num_kv_heads: int, head_dim: int, world_size: int) -> tuple[RowBlock, RowBlock]:
    shards = [kv_group_shard(num_heads, num_kv_heads, r, world_size) for r in range(world_size)]
    return (
        RowBlock(num_heads, head_dim, tuple(s.queries for s in shards)),
        RowBlock(num_kv_heads, head_dim, tuple(s.kv_heads for s in shards)),
    )


class UnsummedGroup(ParallelGroup):
    """A rank of a group whose collectives are skipped: the shapes of its outputs, none of the sums."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.world_size, *x.shape).contiguous()


def shard(model: str | None, split: str, rank: int, world_size: int) -> tuple[nn.Module, ModelRunner]:
    """Rank `rank`'s model under `split` (one rank with world_size 1), with its K/V pools bound."""
    parallel_linear.head_shard, parallel_linear.attention_blocks = (
        QUERY_SPLIT if split == "query" else (kv_group_shard, kv_group_blocks)
    )
    backend = "mp" if world_size > 1 else None
    config = EngineConfig(model=model, tensor_parallel_size=world_size, distributed_executor_backend=backend)
    loaded = load_model(config, NUM_BLOCKS * config.block_size, UnsummedGroup(rank, world_size), rank).model
    return loaded, ModelRunner(loaded, config, NUM_BLOCKS, torch.device("cpu"), None)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="GGUF file, HF folder or embedded model name")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-context", type=int, default=160)
    parser.add_argument("--turns", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = {("one process", 0): shard(args.model, "kv-group", 0, 1)}
    for split in ("kv-group", "query"):
        for rank in range(args.world_size):
            shards[split, rank] = shard(args.model, split, rank, args.world_size)
    cpu, table = torch.device("cpu"), [list(range(NUM_BLOCKS))]
    prompt, context = args.prompt_len, args.decode_context
    steps = {
        f"prefill {prompt}": (
            torch.randint(0, 1000, (prompt,)),
            torch.arange(prompt),
            AttentionMetadata.build(list(range(prompt)), table, [prompt], [prompt], 16, cpu),
            1,
        ),
        f"decode at {context}": (
            torch.tensor([5]),
            torch.tensor([context - 1]),
            AttentionMetadata.build([context - 1], table, [1], [context], 16, cpu),
            20,
        ),
    }
    best = {(key, step): float("inf") for key in shards for step in steps}
    for _ in range(args.turns):
        for step, (ids, positions, meta, calls) in steps.items():
            for key, (model, _) in shards.items():
                start = time.thread_time()
                for _ in range(calls):
                    model(ids, positions, meta)
                best[key, step] = min(best[key, step], (time.thread_time() - start) / calls)
    for (split, rank), (model, _) in shards.items():
        attention = model.layers[0].self_attn
        times = "  ".join(f"{step} {1e3 * best[(split, rank), step]:.2f} ms" for step in steps)
        print(f"{split:11s} rank {rank}: {attention.num_heads} query / {attention.num_kv_heads} K/V heads  {times}")


if __name__ == "__main__":
    main()
