"""The shared-memory collectives against gloo's, across 2 spawned ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.launch import spawn_ranks
from pagedllm.distributed.shared_memory import PeerExitedError, SharedMemoryCollectives, shared_memory_supported

pytestmark = pytest.mark.skipif(not shared_memory_supported(), reason="the shared-memory collectives are a CPU kernel")

HIDDEN_SIZES = (576, 960, 2048, 4096, 8192)


def _matches_gloo(rank: int, world_size: int) -> None:
    group = ParallelGroup.create()
    assert group.shared_memory is not None
    generator = torch.Generator().manual_seed(1000 + rank)
    # Hidden-size vectors and batches of them (a prefill's is summed in shares, an odd count of values making the
    # shares uneven), one bigger than a slot (chunked), float32 and bfloat16.
    shapes = [(n,) for n in HIDDEN_SIZES] + [(7, 576), (512, 576), (333, 577), (600, 2048)]
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            x = torch.randn(shape, generator=generator).to(dtype)
            ours, theirs = group.all_reduce(x.clone()), x.clone()
            dist.all_reduce(theirs)
            assert torch.equal(ours, theirs), (dtype, shape)
            gathered = [torch.empty_like(x) for _ in range(world_size)]
            dist.all_gather(gathered, x)
            assert torch.equal(group.all_gather(x), torch.stack(gathered)), (dtype, shape)
    strided = torch.randn(64, 32, generator=generator).t()
    expected = strided.contiguous()
    dist.all_reduce(expected)
    assert torch.equal(group.all_reduce(strided), expected)
    group.close()
    collectives = SharedMemoryCollectives.create(slot_bytes=256)  # 64 float32: 3 calls per vector below
    for step in range(20):  # consecutive calls reuse the two slots of each rank alternately
        x = torch.full((150,), float(rank + 1) * (step + 1))
        assert torch.equal(collectives.all_reduce(x), torch.full((150,), 3.0 * (step + 1)))
    collectives.close()
    collectives = SharedMemoryCollectives.create(slot_bytes=2**15)  # 8,192 float32: summed in shares, 3 chunks
    for _ in range(6):
        x = torch.randn(20_001, generator=generator)
        expected = x.clone()
        dist.all_reduce(expected)
        assert torch.equal(collectives.all_reduce(x), expected)
    collectives.close()


def test_all_reduce_and_gather_equal_gloo_on_two_ranks() -> None:
    """Hidden-size vectors, batches, a strided tensor, and tensors of several chunks through tiny slots."""
    spawn_ranks(_matches_gloo, 2, timeout_s=120)


def _one_rank_exits(rank: int, world_size: int) -> None:
    collectives = SharedMemoryCollectives.create(timeout_s=60)
    collectives.all_reduce(torch.ones(8))
    if rank == 1:
        time.sleep(0.3)  # rank 0 is asleep in the next call by now
        os._exit(0)  # leaves it waiting there
    started = time.perf_counter()
    with pytest.raises(PeerExitedError, match="rank 1"):
        collectives.all_reduce(torch.ones(8))
    assert time.perf_counter() - started < 10


def test_a_rank_that_exits_fails_the_waiting_one() -> None:
    spawn_ranks(_one_rank_exits, 2, timeout_s=60)


def _late_ranks(rank: int, world_size: int) -> None:
    collectives = SharedMemoryCollectives.create(timeout_s=60)
    for values in (8, 20_000):  # one call, and a sum in shares over two
        collectives.barrier()
        if rank == 1:
            time.sleep(0.5)  # far past the waiting rank's spin: it sleeps until this rank publishes
        waited, wall, cpu = collectives.waited_seconds(), time.perf_counter(), time.thread_time()
        x = torch.full((values,), float(rank + 1))
        assert torch.equal(collectives.all_reduce(x), torch.full((values,), 3.0))
        if rank == 0:  # it left the barrier at most a little after rank 1 did
            assert time.perf_counter() - wall >= 0.25
            assert collectives.waited_seconds() - waited >= 0.25
            assert time.thread_time() - cpu < 0.1, "the waiting rank spun instead of sleeping"
    generator = torch.Generator().manual_seed(7)  # the same draws on both ranks: each knows whose turn it is
    for step in range(120):
        late_rank, delay_us = torch.randint(2, (1,), generator=generator), torch.randint(300, (1,), generator=generator)
        if rank == late_rank:
            time.sleep(delay_us.item() * 1e-6)  # on either side of the spin: the peer spins or sleeps
        values = 8 if step % 2 else 10_000
        x = torch.full((values,), float(rank + 1) * (step + 1))
        assert torch.equal(collectives.all_reduce(x), torch.full((values,), 3.0 * (step + 1))), step
    collectives.close()


def test_ranks_that_arrive_late_or_in_any_order_get_every_sum() -> None:
    """A rank that waits long sleeps (little CPU time) and counts its wait; every sum is right whichever rank comes
    first and whether the other spun or slept meanwhile."""
    spawn_ranks(_late_ranks, 2, timeout_s=120)


def _peer_never_answers(rank: int, world_size: int) -> None:
    collectives = SharedMemoryCollectives.create(timeout_s=0.5)
    collectives.barrier()
    if rank == 1:
        time.sleep(3)  # alive, but past the group's timeout
        return
    with pytest.raises(PeerExitedError, match=r"ranks \[1\] .* did not answer"):
        collectives.all_reduce(torch.ones(8))


def test_a_peer_that_never_answers_fails_the_waiting_rank_after_the_timeout() -> None:
    spawn_ranks(_peer_never_answers, 2, timeout_s=60)
