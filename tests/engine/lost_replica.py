"""A data-parallel replica lost mid-generation: its request fails within seconds and the others serve on."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.data_parallel import DataParallelEngine
from pagedllm.errors import ReplicaLostError

LOST_REPLICA_DEADLINE_S = 10.0


def check_a_lost_replica_fails_its_request_and_the_others_serve(
    engine: DataParallelEngine, one: LLM, prompts: list[list[int]], kill: Callable[[int], None], lost: str
) -> int:
    """Start a long request, kill its replica (`kill(index)`) and step: ReplicaLostError matching `lost` (formatted
    with the replica's index) within the deadline; then a short request gets one engine's text. Returns the index
    of the replica killed."""
    engine.add_request("long", prompts[1], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    engine.step()
    dead = engine.placement["long"]
    kill(dead)
    started = time.monotonic()
    with pytest.raises(ReplicaLostError, match=lost.format(dead)) as raised:
        for _ in range(400):
            engine.step()
    assert time.monotonic() - started < LOST_REPLICA_DEADLINE_S and raised.value.request_ids == ["long"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("short", prompts[0], params)
    assert engine.placement["short"] != dead
    texts = {}
    while engine.has_unfinished_requests():
        texts |= {output.request_id: output.outputs[0].text for output in engine.step() if output.finished}
    assert texts == {"short": one.generate([prompts[0]], params)[0].outputs[0].text}
    return dead
