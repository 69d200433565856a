"""A rank's logits cross the pipe to the driver as a shape, then raw float32 bytes."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from pagedllm.engine.executor import receive_logits, send_logits


@pytest.mark.parametrize("rows", [3, 0])  # 0: a step that samples nothing (a prompt's middle chunk)
def test_logits_arrive_whole_in_an_array_the_sampler_may_write(rows: int) -> None:
    driver_end, rank_end = multiprocessing.Pipe()
    logits = torch.randn(rows, 40, dtype=torch.float32)[:, 8:]  # a rank's slice of the vocabulary: not contiguous
    send_logits(rank_end, logits)
    send_logits(rank_end, logits[:1])  # the next message starts where this one ended
    kind, shape = driver_end.recv()
    values = receive_logits(driver_end, shape)
    assert kind == "logits" and values.shape == (rows, 32)
    assert torch.equal(torch.from_numpy(values), logits)
    assert values.flags.writeable
    kind, shape = driver_end.recv()
    assert torch.equal(torch.from_numpy(receive_logits(driver_end, shape)), logits[:1])
