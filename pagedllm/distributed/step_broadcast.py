"""Rank 0 hands each step's bytes to every other rank over torch.distributed, for ranks on other machines that
have no pipe to the engine's process."""

from __future__ import annotations

import torch
import torch.distributed as dist


class StepBroadcast:
    """Rank 0's `send` of a payload meets every other rank's `receive`; an empty payload means stop."""

    def send(self, payload: bytes) -> None:
        length = torch.tensor([len(payload)], dtype=torch.int64)
        dist.broadcast(length, src=0)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0)

    def receive(self) -> bytes:
        length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src=0)
        if not length.item():
            return b""
        data = torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return data.numpy().tobytes()


def share_from_rank0(values: tuple) -> tuple:
    """Rank 0's `values`, on every rank (each passes its own; only rank 0's are kept)."""
    holder = [values]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
