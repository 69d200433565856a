"""Pipeline parallelism: the layers split into consecutive stages, each held by tensor_parallel_size ranks.

Global rank = stage × tensor_parallel_size + tensor rank. A stage's ranks hold the same activations (their
tensor-parallel sums made them equal), so each hands them to the rank of the same tensor rank in the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The layers of `stage`: consecutive, the first num_layers % num_stages stages one layer more."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage and the layers it holds; a single stage (the default) holds every layer and sends nothing."""

    stage: int
    num_stages: int
    layers: range
    tensor_parallel_size: int = 1

    @classmethod
    def of_rank(cls, rank: int, tensor_parallel_size: int, num_stages: int, num_layers: int) -> PipelineStage:
        stage = rank // tensor_parallel_size
        return cls(stage, num_stages, stage_layers(num_layers, num_stages, stage), tensor_parallel_size)

    @classmethod
    def whole(cls, num_layers: int) -> PipelineStage:
        return cls(0, 1, range(num_layers))

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def send_activations(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Hand the hidden states and the residual stream to the next stage's rank of this tensor rank."""
        peer = dist.get_rank() + self.tensor_parallel_size
        dist.send(torch.stack([hidden, residual]).contiguous(), dst=peer)

    def receive_activations(
        self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous stage's (hidden states, residual stream) of `num_tokens` tokens."""
        both = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(both, src=dist.get_rank() - self.tensor_parallel_size)
        return both[0], both[1]

    def logits_to_rank0(
        self, logits: torch.Tensor | None, num_rows: int, vocab_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """The step's logits on global rank 0 (which answers the driver), sent there by the last stage's first
        tensor rank; None on the other ranks."""
        rank = dist.get_rank() if self.num_stages > 1 else 0
        source = (self.num_stages - 1) * self.tensor_parallel_size
        if rank == source:
            if rank != 0:
                dist.send(logits.contiguous(), dst=0)
                return None
            return logits
        if rank == 0:
            received = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
            dist.recv(received, src=source)
            return received
        return None
