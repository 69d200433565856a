"""Tensor parallelism on the ray executor: one rank on each node of a two-node Ray cluster on this host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pagedllm import LLM, SamplingParams
from pagedllm.engine.executor import WorkerError
from pagedllm.engine.ray_executor import RayExecutor
from tests.engine.dead_rank import DEAD_WORKER_DEADLINE_S, check_server_answers_then_503_after
from tests.engine.ray_cluster import ray_cluster
from tests.logprobs_close import assert_greedy_close, greedy

TINY_KV_BYTES = 2**24
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Cluster]:
    """A head and a second node, one CPU each, so that the two ranks of TP=2 land on different nodes."""
    with ray_cluster(nodes=2, cpus_per_node=1) as cluster:
        yield cluster


@pytest.fixture
def tiny_ray_tp2(two_node_cluster: Cluster, tiny_llama_dir: Path) -> Iterator[LLM]:
    llm = LLM(
        str(tiny_llama_dir),
        dtype="float32",
        quantization="none",
        kv_cache_memory=TINY_KV_BYTES,
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        num_threads=1,
    )
    yield llm
    llm.engine.shutdown()


def executor(llm: LLM) -> RayExecutor:
    return llm.engine.runner.executor


def test_ray_tp2_across_two_nodes_equals_one_process(tiny_ray_tp2: LLM, tiny_llama_dir: Path) -> None:
    nodes = executor(tiny_ray_tp2).node_ids()
    assert len(set(nodes)) == 2, f"both ranks were placed on node {nodes[0]}"
    one = LLM(str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)
    assert_greedy_close(greedy(one, PROMPTS, 24), greedy(tiny_ray_tp2, PROMPTS, 24))
    assert tiny_ray_tp2.engine.num_blocks == one.engine.num_blocks


def test_a_killed_ray_rank_fails_the_step_within_seconds_and_frees_the_cluster(tiny_ray_tp2: LLM) -> None:
    engine = tiny_ray_tp2.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    ray.kill(executor(tiny_ray_tp2).workers[1])
    started = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 is gone"):
        for _ in range(400):
            engine.step()
    assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S
    with pytest.raises(WorkerError):  # every later step fails at once
        engine.step()
    deadline = time.monotonic() + DEAD_WORKER_DEADLINE_S  # the cluster's resource view follows within seconds
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2  # rank 0 killed, the placement group removed


def test_the_server_over_ray_answers_as_the_engine_does_and_503_once_a_rank_dies(tiny_ray_tp2: LLM) -> None:
    check_server_answers_then_503_after(tiny_ray_tp2, PROMPTS[1], lambda: ray.kill(executor(tiny_ray_tp2).workers[0]))
