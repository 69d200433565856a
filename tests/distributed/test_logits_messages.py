"""A rank's logits cross the pipe to the driver as a shape, then raw float32 bytes."""

from __future__ import annotations

import multiprocessing

import torch

from pagedllm.engine.executor import receive_logits, send_logits


def test_logits_arrive_whole_in_an_array_the_sampler_may_write() -> None:
    driver_end, rank_end = multiprocessing.Pipe()
    logits = torch.randn(3, 40, dtype=torch.float32)[:, 8:]  # a rank's slice of the vocabulary: not contiguous
    send_logits(rank_end, logits)
    kind, shape = driver_end.recv()
    values = receive_logits(driver_end, shape)
    assert kind == "logits" and values.shape == (3, 32)
    assert torch.equal(torch.from_numpy(values), logits)
    assert values.flags.writeable
