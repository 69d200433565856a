"""Pipeline stages and data-parallel replicas on Ray: a two-node Ray cluster on this host, a stage or a replica on
each node."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from pagedllm import LLM, SamplingParams
from pagedllm.engine.data_parallel import DataParallelEngine
from pagedllm.engine.ray_executor import RayExecutor
from pagedllm.errors import ReplicaLostError
from pagedllm.serving.logprobs import TokenStrings
from tests.engine.dead_rank import DEAD_WORKER_DEADLINE_S, check_server_answers_then_503_after
from tests.engine.lost_replica import check_a_lost_replica_fails_its_request_and_the_others_serve
from tests.engine.ray_cluster import ray_cluster
from tests.engine.served import served_greedy
from tests.engine.test_pipeline_parallel import BatchesInFlight
from tests.engine.test_tensor_parallel import sharegpt_prompts
from tests.logprobs_close import assert_greedy_close, assert_served_greedy_close, greedy

TINY_KV_BYTES = 2**24
EMBEDDED_KV_BYTES = 2**26
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Cluster]:
    """Two nodes of two CPUs: ranks of two threads take a node each, ranks of one thread pack two to a node."""
    with ray_cluster(nodes=2, cpus_per_node=2) as cluster:
        yield cluster


def ray_pipeline(
    model_dir: Path | None, tensor_parallel_size: int, num_threads: int, kv_cache_memory: int = TINY_KV_BYTES
) -> LLM:
    """Two pipeline stages of `tensor_parallel_size` Ray ranks each; the embedded model where `model_dir` is None."""
    return LLM(
        str(model_dir) if model_dir is not None else None,
        dtype="float32",
        quantization="none",
        kv_cache_memory=kv_cache_memory,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
        num_threads=num_threads,
    )


def executor(llm: LLM) -> RayExecutor:
    return llm.engine.runner.executor


def assert_stages_on_two_nodes(split: LLM, tensor_parallel_size: int) -> None:
    """Each stage's ranks share a node, and the two stages have a node each."""
    nodes = executor(split).node_ids()
    stages = [set(nodes[stage * tensor_parallel_size : (stage + 1) * tensor_parallel_size]) for stage in (0, 1)]
    assert all(len(stage) == 1 for stage in stages), f"a stage's ranks were spread over nodes: {nodes}"
    assert stages[0] != stages[1], f"both stages were placed on node {nodes[0]}"


@pytest.fixture(scope="module")
def one(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)


@pytest.fixture(scope="module")
def ray_tp2_pp2(two_node_cluster: Cluster, tiny_llama_dir: Path) -> Iterator[LLM]:
    """TP=2 x PP=2: four ranks of one thread, a stage of two on each node; the server test, last, stops them."""
    split = ray_pipeline(tiny_llama_dir, 2, 1)
    yield split
    split.engine.shutdown()


def test_ray_pipeline_stages_on_two_nodes_equal_one_process(
    two_node_cluster: Cluster, tiny_llama_dir: Path, one: LLM
) -> None:
    split = ray_pipeline(tiny_llama_dir, 1, 2)
    try:
        assert_stages_on_two_nodes(split, 1)
        assert_greedy_close(greedy(one, PROMPTS, 24), greedy(split, PROMPTS, 24))
        assert split.engine.num_blocks == one.engine.num_blocks
    finally:
        split.engine.shutdown()


def test_ray_tensor_parallel_stages_on_two_nodes_equal_one_process(ray_tp2_pp2: LLM, one: LLM) -> None:
    """With micro-batches: a batch goes to the first stage while the second stage runs the one before."""
    assert_stages_on_two_nodes(ray_tp2_pp2, 2)
    spy = BatchesInFlight(ray_tp2_pp2.engine)
    assert_greedy_close(greedy(one, PROMPTS, 24), greedy(ray_tp2_pp2, PROMPTS, 24))
    assert spy.beside_another > 0
    assert ray_tp2_pp2.engine.num_blocks == one.engine.num_blocks


def test_the_server_over_ray_tensor_parallel_stages_answers_concurrent_requests_as_one_process(
    ray_tp2_pp2: LLM, one: LLM
) -> None:
    served = served_greedy(ray_tp2_pp2, PROMPTS, 16)  # the server shuts the ranks down as it stops
    assert_served_greedy_close(greedy(one, PROMPTS, 16), served, TokenStrings(one.engine.tokenizer))


def test_the_server_over_ray_stages_answers_as_the_engine_does_and_503_once_the_last_stage_dies(
    two_node_cluster: Cluster, tiny_llama_dir: Path
) -> None:
    split = ray_pipeline(tiny_llama_dir, 1, 2)
    try:
        check_server_answers_then_503_after(split, PROMPTS[1], lambda: ray.kill(executor(split).workers[1]))
    finally:
        split.engine.shutdown()


@pytest.mark.slow
def test_the_server_over_ray_tp2_pp2_on_the_embedded_model_answers_sharegpt_as_one_process(
    two_node_cluster: Cluster, llm: LLM
) -> None:
    """8 ShareGPT prompts sent at once to the server over 2 stages of 2 Ray ranks, float32, quantization=none."""
    prompts = sharegpt_prompts(8)
    split = ray_pipeline(None, 2, 1, EMBEDDED_KV_BYTES)
    try:
        assert_stages_on_two_nodes(split, 2)
        served = served_greedy(split, prompts, 16)
    finally:
        split.engine.shutdown()
    assert_served_greedy_close(greedy(llm, prompts, 16), served, TokenStrings(llm.engine.tokenizer))


@pytest.fixture
def ray_dp2(two_node_cluster: Cluster, tiny_llama_dir: Path) -> Iterator[LLM]:
    """Two replicas of two threads each: one on each node."""
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    llm = LLM(str(tiny_llama_dir), **settings, data_parallel_size=2, distributed_executor_backend="ray", num_threads=2)
    yield llm
    llm.engine.shutdown()


def test_ray_replicas_on_two_nodes_equal_one_engine(ray_dp2: LLM, tiny_llama_dir: Path) -> None:
    engine = ray_dp2.engine
    assert isinstance(engine, DataParallelEngine)
    nodes = engine.links.node_ids()
    assert len(set(nodes)) == 2, f"both replicas were placed on node {nodes[0]}"
    one = LLM(str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)
    assert_greedy_close(greedy(one, PROMPTS, 16), greedy(ray_dp2, PROMPTS, 16))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", prompt, params)
    engine.abort_request("r0")  # sent after its add: the replica applies them in that order
    assert engine.loads == [1, 2]
    while engine.has_unfinished_requests():
        assert all(output.request_id != "r0" for output in engine.step())
    assert engine.loads == [0, 0]


def test_a_killed_ray_replica_fails_its_requests_and_the_other_serves_on(ray_dp2: LLM, one: LLM) -> None:
    engine = ray_dp2.engine
    assert isinstance(engine, DataParallelEngine)
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    engine.step()
    dead = engine.placement["a"]
    ray.kill(engine.links.actors[dead])
    started = time.monotonic()
    with pytest.raises(ReplicaLostError, match=rf"replica {dead} is gone") as raised:
        for _ in range(400):
            engine.step()
    assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S and raised.value.request_ids == ["a"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("b", PROMPTS[0], params)
    assert engine.placement["b"] == 1 - dead
    texts = {}
    while engine.has_unfinished_requests():
        texts |= {output.request_id: output.outputs[0].text for output in engine.step() if output.finished}
    assert texts == {"b": one.generate([PROMPTS[0]], params)[0].outputs[0].text}


def test_the_server_over_ray_replicas_answers_as_the_engine_does_and_503_once_the_replicas_die(ray_dp2: LLM) -> None:
    """One replica's death takes it out of the router (test_data_parallel.py); with both gone the engine stops."""
    engine = ray_dp2.engine
    assert isinstance(engine, DataParallelEngine)
    check_server_answers_then_503_after(ray_dp2, PROMPTS[1], lambda: [ray.kill(actor) for actor in engine.links.actors])


def test_ray_replicas_of_tp2_ranks_take_a_node_each_equal_one_engine_and_die_with_their_ranks(
    two_node_cluster: Cluster, tiny_llama_dir: Path, one: LLM
) -> None:
    """DP=2 of TP=2: each replica's two ranks (one thread each) fill a node, the replica itself takes no CPU;
    greedy outputs as one engine's; a replica killed mid-generation fails its request within seconds, its ranks
    and their placement group go with it (their node's CPUs come back), and the other replica serves on."""
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    llm = LLM(
        str(tiny_llama_dir),
        **settings,
        data_parallel_size=2,
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
    )
    engine = llm.engine
    assert isinstance(engine, DataParallelEngine)
    try:
        assert ray.available_resources().get("CPU", 0) == 0  # 4 ranks of one CPU on 2 nodes of 2
        replica_nodes = engine.links.node_ids()
        assert len(set(replica_nodes)) == 2, f"both replicas were placed on node {replica_nodes[0]}"
        assert_greedy_close(greedy(one, PROMPTS, 16), greedy(llm, PROMPTS, 16))
        check_a_lost_replica_fails_its_request_and_the_others_serve(
            engine, one, PROMPTS, lambda index: ray.kill(engine.links.actors[index]), "replica {} is gone"
        )
        deadline = time.monotonic() + DEAD_WORKER_DEADLINE_S
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 2  # the dead replica's ranks gave their CPUs back
    finally:
        engine.shutdown()
