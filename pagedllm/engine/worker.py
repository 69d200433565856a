"""One rank of a model: its shard of the weights, the KV pools of its heads, and the forward of each step."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.engine.host_memory import release_freed_memory
from pagedllm.engine.model_runner import allocate_kv_pool
from pagedllm.layers.attention import AttentionMetadata, KVPool, copy_blocks
from pagedllm.layers.quantization import LinearQuantization
from pagedllm.model.fused_decode import FusedDecode
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import load_checkpoint
from pagedllm.model.registry import resolve_model_path

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    """One step's work as every rank needs it: plain lists, which the driver pickles once and sends to each rank."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    query_lens: list[int]
    seq_lens: list[int]
    logit_rows: list[int]  # rows of the batch whose logits the driver samples or scores, in its order
    block_copies: list[tuple[int, int]]  # (source, destination) copy-on-write blocks, before the forward


def local_model_config(model: LlamaForCausalLM) -> ModelConfig:
    """The model's shape as one rank holds it: its query and K/V heads."""
    attention = model.layers[0].self_attn
    return dataclasses.replace(model.config, num_heads=attention.num_heads, num_kv_heads=attention.num_kv_heads)


def pin_rank_threads(rank: int, world_size: int, num_threads: int) -> int:
    """Give this rank `num_threads` torch threads (0: its share of the cores this process may use), pinned to
    cores of its own where there are enough for every rank; returns the thread count."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    threads = num_threads or max(1, len(cores) // world_size)
    if world_size > 1 and len(cores) >= world_size * threads and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores[rank * threads : (rank + 1) * threads])
    torch.set_num_threads(threads)
    return threads


class Worker:
    """Loads this rank's shard of the model and runs each step's forward over its own K/V pools."""

    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        group: ParallelGroup,
        device: torch.device,
    ) -> None:
        self.config = config
        self.device = device
        self.group = group
        path = resolve_model_path(config.model)
        checkpoint = load_checkpoint(path, config.torch_dtype, keep_quantized=config.quantization == "auto")
        model = LlamaForCausalLM(
            checkpoint.config,
            max_model_len,
            config.attention_impl,
            checkpoint.weights.get("rope_freqs"),
            LinearQuantization(config.quantization, config.quant_group_size, config.dense_matmul_min_rows),
            group,
        )
        model.load_weights(checkpoint.weights)
        del checkpoint
        release_freed_memory()
        self.model = model.to(device)
        local = local_model_config(model)
        self.k_pools: list[KVPool] = [
            allocate_kv_pool(local, config, num_blocks, device) for _ in range(local.num_layers)
        ]
        self.v_pools: list[KVPool] = [
            allocate_kv_pool(local, config, num_blocks, device) for _ in range(local.num_layers)
        ]
        model.bind_kv_cache(self.k_pools, self.v_pools)
        # One kernel call for every layer has no room for the sums between a rank's layers.
        fused = config.fused_decode and group.world_size == 1
        self.fused_decode = FusedDecode.of(model, self.k_pools, self.v_pools) if fused else None
        logger.info(
            "rank %d of %d: %d KV heads, %d query heads",
            group.rank,
            group.world_size,
            local.num_kv_heads,
            local.num_heads,
        )

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Float32 logits [len(logit_rows), vocab] of the step's rows the driver asked for."""
        if step.block_copies:
            src = torch.tensor([s for s, _ in step.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in step.block_copies], device=self.device)
            for pool in (*self.k_pools, *self.v_pools):
                copy_blocks(pool, src, dst)
        meta = AttentionMetadata.build(
            step.slot_mapping, step.block_tables, step.query_lens, step.seq_lens, self.config.block_size, self.device
        )
        input_ids = torch.tensor(step.input_ids, device=self.device)
        positions = torch.tensor(step.positions, device=self.device)
        if self.fused_decode is not None and self.fused_decode.takes(meta):
            hidden = self.fused_decode.forward(self.model.embed_tokens(input_ids), positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[step.logit_rows])
