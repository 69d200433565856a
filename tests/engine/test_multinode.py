"""Tensor parallelism over two nodes with the mp executor, both simulated on this host: node 0 runs the engine,
node 1 `pagedllm serve --headless`, their ranks meeting at master_addr:master_port."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.distributed.process_group import free_port
from pagedllm.engine.executor import WorkerError, run_headless
from pagedllm.errors import ConfigError
from tests.engine.dead_rank import DEAD_WORKER_DEADLINE_S
from tests.logprobs_close import assert_greedy_close, greedy

TINY_KV_BYTES = 2**24
NODE_EXIT_TIMEOUT_S = 60.0
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


@pytest.fixture
def two_nodes(tiny_llama_dir: Path) -> Iterator[tuple[LLM, subprocess.Popen]]:
    """Node 1's headless ranks, then node 0's engine: one rank each."""
    port = free_port()
    node1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pagedllm.cli",
            "serve",
            "--headless",
            "--model",
            str(tiny_llama_dir),
            "--tensor-parallel-size",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-port",
            str(port),
        ]
    )
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    llm = LLM(str(tiny_llama_dir), **settings, tensor_parallel_size=2, nnodes=2, master_port=port)
    yield llm, node1
    llm.engine.shutdown()
    if node1.poll() is None:
        node1.kill()
        node1.wait()


def test_two_nodes_equal_one_process_and_node1_ends_with_the_engine(two_nodes, tiny_llama_dir: Path) -> None:
    llm, node1 = two_nodes
    assert llm.engine.runner.executor.ranks == range(0, 1)  # rank 1 runs under node 1
    one = LLM(str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)
    assert_greedy_close(greedy(one, PROMPTS, 24), greedy(llm, PROMPTS, 24))
    llm.engine.shutdown()
    assert node1.wait(NODE_EXIT_TIMEOUT_S) == 0


def test_a_killed_rank_on_the_other_node_fails_the_step_within_seconds(two_nodes) -> None:
    llm, node1 = two_nodes
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    (rank1,) = [child for child in psutil.Process(node1.pid).children() if "spawn_main" in " ".join(child.cmdline())]
    rank1.kill()
    started = time.monotonic()
    with pytest.raises(WorkerError, match="a model worker failed"):  # rank 0 finds its peer gone
        for _ in range(400):
            engine.step()
    assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S
    assert node1.wait(NODE_EXIT_TIMEOUT_S) == 1


def test_settings_of_several_nodes_are_checked_by_name() -> None:
    with pytest.raises(ConfigError, match="master_port") as raised:
        EngineConfig(tensor_parallel_size=2, nnodes=2)
    assert raised.value.param == "master_port"
    with pytest.raises(ConfigError, match="split evenly") as raised:
        EngineConfig(tensor_parallel_size=3, nnodes=2, master_port=29500)
    with pytest.raises(ConfigError, match="mp executor"):
        EngineConfig(tensor_parallel_size=2, nnodes=2, master_port=29500, distributed_executor_backend="ray")
    with pytest.raises(ConfigError, match="node_rank"):
        EngineConfig(tensor_parallel_size=2, nnodes=2, node_rank=2, master_port=29500)
    with pytest.raises(ConfigError, match="--headless"):
        run_headless(EngineConfig(tensor_parallel_size=2, nnodes=2, master_port=29500))
