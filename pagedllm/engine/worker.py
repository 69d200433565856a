"""One rank of a model: its shard of the weights, the KV pools of its heads, and the forward of each step."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.pipeline import PipelineStage
from pagedllm.engine.host_memory import release_freed_memory
from pagedllm.engine.model_runner import ModelRunner, StepInput, kv_cache_shape
from pagedllm.errors import ConfigError
from pagedllm.layers.parallel_linear import ParallelLMHead, column_unit
from pagedllm.layers.quantization import LinearQuantization
from pagedllm.model.gemma3 import Gemma3ForCausalLM
from pagedllm.model.lazy_weights import weight_layout
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import load_checkpoint
from pagedllm.model.registry import model_class, resolve_model_path

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    weight_bytes: int  # this process's weights
    file_weight_bytes: int  # the whole checkpoint's, 0 where unknown


def load_model(
    config: EngineConfig, max_model_len: int, group: ParallelGroup | None = None, rank: int = 0
) -> LoadedModel:
    """The model of `config`, or global rank `rank`'s shard of it (the layers of its pipeline stage, split with
    the other ranks of its tensor-parallel `group`), on the config's device."""
    group = group or ParallelGroup()
    path = resolve_model_path(config.model)
    checkpoint = load_checkpoint(path, config.torch_dtype, keep_quantized=config.quantization == "auto")
    cls = model_class(checkpoint.config.architecture)
    quantization = LinearQuantization(config.quantization, config.quant_group_size, config.dense_matmul_min_rows)
    args = (checkpoint.config, max_model_len, config.attention_impl, checkpoint.weights.get("rope_freqs"), quantization)
    if config.world_size > 1:
        if cls not in (LlamaForCausalLM, Gemma3ForCausalLM):
            raise ConfigError(
                f"tensor and pipeline parallelism run Llama-family and Gemma 3 models; "
                f"{checkpoint.config.architecture} runs in one process",
                "tensor_parallel_size",
            )
        if cls is not LlamaForCausalLM and config.pipeline_parallel_size > 1:
            raise ConfigError(
                f"pipeline parallelism runs Llama-family models; {checkpoint.config.architecture} runs in one stage",
                "pipeline_parallel_size",
            )
        stage = PipelineStage.of_rank(
            rank, config.tensor_parallel_size, config.pipeline_parallel_size, checkpoint.config.num_layers
        )
        # One split of the MLP's channels for every layer: runs that keep each layer's down_proj blocks whole.
        # Read from the checkpoint's layouts: each down_proj's data is read once, when its layer takes it.
        down_projs = (weight_layout(checkpoint.weights, f"model.layers.{i}.mlp.down_proj.weight") for i in stage.layers)
        unit = math.lcm(*(column_unit(layout, quantization) for layout in down_projs))
        model = cls(*args, group=group, stage=stage, channel_unit=unit)
    else:
        model = cls(*args)
    model.load_weights(checkpoint.weights)
    loaded = LoadedModel(model.to(torch.device(config.device)), model.weight_bytes(), checkpoint.file_weight_bytes)
    del checkpoint
    release_freed_memory()  # the loader's dequantized copies: freed, but resident until returned
    return loaded


def usable_cores() -> list[int]:
    """The cores this process may run on (which the ranks it starts inherit)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def rank_threads(world_size: int, num_threads: int, cores: list[int]) -> int:
    """Each rank's torch threads: `num_threads`, or (0) its share of `cores`."""
    return num_threads or max(1, len(cores) // world_size)


def rank_cores(rank: int, world_size: int, num_threads: int, cores: list[int]) -> list[int]:
    """The cores of `cores` that pin_rank_threads pins rank `rank` to; empty where the ranks are not pinned (one
    rank, or too few cores for every rank's threads)."""
    threads = rank_threads(world_size, num_threads, cores)
    if world_size == 1 or len(cores) < world_size * threads or not hasattr(os, "sched_setaffinity"):
        return []
    return cores[rank * threads : (rank + 1) * threads]


def pin_rank_threads(rank: int, world_size: int, num_threads: int) -> int:
    """Give this rank `num_threads` torch threads (0: its share of the cores this process may use), pinned to
    cores of its own where there are enough for every rank; returns the thread count."""
    cores = usable_cores()
    pinned = rank_cores(rank, world_size, num_threads, cores)
    if pinned:
        os.sched_setaffinity(0, pinned)
    threads = rank_threads(world_size, num_threads, cores)
    torch.set_num_threads(threads)
    return threads


def logits_ranks(config: EngineConfig) -> range:
    """The global ranks whose logits the mp driver joins, in vocabulary order: every rank of the last stage, each
    handing its own slice, on one node; on several, rank 0 alone (logits_rank), with the whole vocabulary."""
    if config.nnodes > 1:
        return range(0, 1)
    first = logits_rank(config)
    return range(first, first + config.tensor_parallel_size)


def logits_rank(config: EngineConfig) -> int:
    """The global rank that hands each step's logits to the driver: the last stage's first tensor rank, which
    computes them, so that the earlier stages go on to the next step meanwhile; rank 0 where the mp ranks span
    several nodes (only node 0's ranks have a pipe to the driver), the last stage sending them there."""
    if config.nnodes > 1:
        return 0
    return (config.pipeline_parallel_size - 1) * config.tensor_parallel_size


def tensor_parallel_group(config: EngineConfig, rank: int, device: torch.device) -> ParallelGroup:
    """The group of `rank`'s pipeline stage; every rank creates every stage's group, in the same order."""
    tp = config.tensor_parallel_size
    groups = [
        ParallelGroup.create(list(range(stage * tp, (stage + 1) * tp)), device=device)
        for stage in range(config.pipeline_parallel_size)
    ]
    return groups[rank // tp]


class Worker:
    """Loads this rank's shard of the model and runs each step's forward over its own K/V pools (the driver's
    block tables index them: every rank holds the same blocks, each for its own heads)."""

    def __init__(
        self, config: EngineConfig, num_blocks: int, max_model_len: int, group: ParallelGroup, rank: int
    ) -> None:
        loaded = load_model(config, max_model_len, group, rank)
        self.model = loaded.model
        self.stage: PipelineStage = loaded.model.stage
        self.device = torch.device(config.device)
        self.logits_to_rank0 = config.nnodes > 1
        self.weight_bytes, self.file_weight_bytes = loaded.weight_bytes, loaded.file_weight_bytes
        # A fused decode runs every layer in one kernel call, summing a tensor-parallel rank's partial outputs
        # between them through shared memory (FusedDecode.of leaves other groups unfused); a pipeline stage hands
        # its residual stream on unfinished, which the kernel does not.
        runner_config = replace(config, fused_decode=config.fused_decode and config.pipeline_parallel_size == 1)
        self.runner = ModelRunner(loaded.model, runner_config, num_blocks, self.device, None)
        shape = kv_cache_shape(loaded.model)
        logger.info(
            "rank %d: tensor rank %d of %d, layers %s, %d K/V heads",
            rank,
            group.rank,
            group.world_size,
            self.stage.layers,
            shape.num_kv_heads,
        )

    def hand_logit_slices(self) -> None:
        """From now on each rank of the last stage returns only its own slice of the vocabulary's logits (its
        vocab_range), with no gather between the ranks: for a driver that hears from every one of them."""
        if isinstance(self.model.lm_head, ParallelLMHead):
            self.model.lm_head.gather = False

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        """Float32 logits [len(step.logit_rows), vocab] on every rank of the last stage (the lm_head gathers them;
        after hand_logit_slices each rank's own slice of the vocabulary), or on several nodes on global rank 0
        instead; None on the other ranks."""
        hidden, _ = self.runner.hidden_states(step)
        logits = self.model.compute_logits(hidden[step.logit_rows]) if self.stage.is_last else None
        if self.stage.num_stages == 1 or not self.logits_to_rank0:
            return logits
        return self.stage.logits_to_rank0(logits, len(step.logit_rows), self.model.config.vocab_size, self.device)
