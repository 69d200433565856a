"""The driver's model runner when ranks in other processes hold the model: it batches and samples here, and
each step's forward runs on the executor's ranks."""

from __future__ import annotations

import dataclasses

import torch

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.executor import Executor
from pagedllm.engine.model_runner import ModelRunner, PreparedStep, StepInput, StepResult, kv_cache_bytes_per_block
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.errors import InvalidArgumentError
from pagedllm.layers.parallel_linear import head_shard
from pagedllm.model.hidden_states import HiddenCapture
from pagedllm.structured_output.manager import StructuredOutputManager


def kv_heads_on_all_ranks(model_config: ModelConfig, tensor_parallel_size: int) -> int:
    """K/V heads held by all ranks together: each once, and once more on every further rank whose query heads read
    it (head_shard)."""
    mc = model_config
    return sum(
        len(head_shard(mc.num_heads, mc.num_kv_heads, r, tensor_parallel_size).kv_heads)
        for r in range(tensor_parallel_size)
    )


def distributed_bytes_per_block(model_config: ModelConfig, config: EngineConfig) -> int:
    """One block's K and V on every rank together."""
    heads = kv_heads_on_all_ranks(model_config, config.tensor_parallel_size)
    shape = dataclasses.replace(model_config, num_heads=heads, num_kv_heads=heads)
    return kv_cache_bytes_per_block(shape, config.block_size, config.torch_dtype, config.kv_cache_dtype)


class DistributedModelRunner(ModelRunner):
    """A ModelRunner holding no model and no KV pools (the executor's ranks hold them): its forward sends the
    step to the ranks and takes rank 0's logits; batching, sampling and verification are ModelRunner's."""

    def __init__(
        self,
        executor: Executor,
        model_config: ModelConfig,
        config: EngineConfig,
        device: torch.device,
        structured_output: StructuredOutputManager,
    ) -> None:
        # ModelRunner.__init__ would build a model's pools here; the ranks own them.
        self.executor = executor
        self.device = device
        self.block_size = config.block_size
        self.report_attention = False  # the h2o policy, which needs it, does not run in worker processes
        self._set_up_sampling(config, model_config.vocab_size, structured_output)
        self.bytes_per_block = distributed_bytes_per_block(model_config, config)

    def forward(self, step: StepInput, capture: HiddenCapture | None = None) -> torch.Tensor:
        """The ranks' logits; hidden states stay on the ranks (LLMEngine refuses the requests that need them)."""
        _refuse_capture(capture)
        self.executor.submit(step)
        return self.executor.collect().to(self.device)

    def submit(self, out: SchedulerOutput, block_manager: BlockManager) -> PreparedStep:
        """Hand the scheduled batch to the ranks without waiting for its logits."""
        prepared = self.prepare(out, block_manager)
        _refuse_capture(prepared.capture)
        self.executor.submit(prepared.step)
        return prepared

    def collect(self, prepared: PreparedStep, block_manager: BlockManager) -> StepResult:
        """The result of `prepared`, the oldest batch submitted and not yet collected."""
        return self.sample(prepared, self.executor.collect().to(self.device), block_manager)


def _refuse_capture(capture: HiddenCapture | None) -> None:
    if capture is not None:
        raise InvalidArgumentError("contrastive search and DoLa need the model in this process", "tensor_parallel_size")
