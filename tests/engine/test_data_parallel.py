"""Data parallelism: engine replicas in processes of their own against one engine."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.data_parallel import DataParallelEngine
from pagedllm.engine.executor import WorkerError
from pagedllm.errors import ConfigError, ReplicaLostError, RequestTooLongError
from pagedllm.serving.api_server import create_app
from pagedllm.serving.settings import ServerSettings
from tests.engine.lost_replica import check_a_lost_replica_fails_its_request_and_the_others_serve
from tests.logprobs_close import assert_greedy_close, greedy

TINY_KV_BYTES = 2**24
DEAD_REPLICA_DEADLINE_S = 10.0
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


@pytest.fixture(scope="module")
def one_and_dp2(tiny_llama_dir: Path) -> Iterator[tuple[LLM, LLM]]:
    """The tiny random Llama as one engine and as 2 replicas."""
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    dp2 = LLM(str(tiny_llama_dir), **settings, data_parallel_size=2)
    yield LLM(str(tiny_llama_dir), **settings), dp2
    dp2.engine.shutdown()


def finish(engine: DataParallelEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_dp2_greedy_outputs_equal_one_engine_and_requests_go_to_the_less_loaded_replica(
    one_and_dp2: tuple[LLM, LLM],
) -> None:
    one, dp2 = one_and_dp2
    engine = dp2.engine
    assert isinstance(engine, DataParallelEngine)
    assert_greedy_close(greedy(one, PROMPTS, 16), greedy(dp2, PROMPTS, 16))
    assert engine.stats().generation_tokens == 16 * len(PROMPTS)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", prompt, params)
    assert engine.loads == [2, 2]
    engine.abort_request("r0")
    engine.add_request("r4", PROMPTS[0], params)
    assert [engine.placement[f"r{index}"] for index in range(1, 5)] == [1, 0, 1, 0]  # r4 where r0 left room
    with pytest.raises(RequestTooLongError):  # a replica's refusal reaches the caller as itself
        engine.add_request("long", PROMPTS[0], SamplingParams(max_tokens=10**6))
    finish(engine)
    assert engine.loads == [0, 0]


def test_prompts_sharing_a_long_prefix_go_to_the_replica_that_cached_it_and_others_spread_by_load(
    one_and_dp2: tuple[LLM, LLM],
) -> None:
    _, dp2 = one_and_dp2
    engine = dp2.engine
    assert isinstance(engine, DataParallelEngine)
    finish(engine)
    system = "You are a careful assistant who answers in one short sentence and never makes anything up. " * 6
    first, second = system + "What is the capital of France?", system + "Name a colour of the sky."
    first_ids, second_ids = engine.tokenizer.encode(first), engine.tokenizer.encode(second)
    shared = next(i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b)
    block_size = engine.config.block_size
    expected_hit = min(shared, len(second_ids) - 1) // block_size * block_size
    assert expected_hit >= engine.config.prefix_affinity_min_tokens
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    before = engine.stats().replica_prefix_caches
    engine.add_request("first", first, params)
    home = engine.placement["first"]
    assert home == 0  # both idle, nothing cached: the first of the least loaded
    finish(engine)  # its prompt's blocks are in `home`'s prefix cache now
    # An unrelated request makes `home` the busier replica; the second prompt goes there all the same.
    engine.add_request("busy", list(range(3000, 3040)), params)
    assert engine.placement["busy"] == home
    engine.add_request("second", second, params)
    assert engine.placement["second"] == home
    assert engine.loads[home] == 2 and engine.loads[1 - home] == 0
    for index in range(3):  # unrelated prompts still spread by load
        engine.add_request(f"other{index}", list(range(4000 + 100 * index, 4040 + 100 * index)), params)
    assert [engine.placement[f"other{index}"] for index in range(3)] == [1, 1, 0]
    finish(engine)
    after = engine.stats().replica_prefix_caches
    assert after[home].hit_tokens - before[home].hit_tokens == expected_hit
    assert after[1 - home].hit_tokens == before[1 - home].hit_tokens
    assert after[home].hit_rate > 0


def test_the_server_over_replicas_answers_concurrent_requests_as_they_do_offline(one_and_dp2: tuple[LLM, LLM]) -> None:
    _, dp2 = one_and_dp2
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [output.outputs[0].text for output in dp2.generate(PROMPTS, params)]

    async def scenario() -> list[str]:
        app = create_app(dp2.engine, ServerSettings())
        app.state.engine.start()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True} for p in PROMPTS]
                answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))
                assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
                metrics = (await http.get("/metrics")).text
                for replica in (0, 1):
                    assert (
                        f'pagedllm_replica_prefix_cache_hit_rate{{model_name="{dp2.engine.model_name}",replica="{replica}"}}'
                        in metrics
                    )
                return [answer.json()["choices"][0]["text"] for answer in answers]
        finally:
            await app.state.engine.shutdown()

    assert asyncio.run(scenario()) == expected


@pytest.fixture
def dp2(tiny_llama_dir: Path) -> Iterator[LLM]:
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    llm = LLM(str(tiny_llama_dir), **settings, data_parallel_size=2)
    yield llm
    llm.engine.shutdown()


def kill_replica(engine: DataParallelEngine, index: int) -> None:
    os.kill(engine.links.processes[index].pid, signal.SIGKILL)


def test_a_killed_replica_fails_its_requests_within_seconds_and_the_other_serves_on(
    one_and_dp2: tuple[LLM, LLM], dp2: LLM
) -> None:
    one, _ = one_and_dp2
    engine = dp2.engine
    assert isinstance(engine, DataParallelEngine)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    engine.add_request("a", PROMPTS[1], long)
    engine.add_request("b", PROMPTS[3], long)
    dead, alive = engine.placement["a"], engine.placement["b"]
    assert dead != alive
    engine.step()
    kill_replica(engine, dead)
    started = time.monotonic()
    with pytest.raises(ReplicaLostError, match=rf"replica {dead} \(pid \d+\) exited") as raised:
        for _ in range(400):
            engine.step()
    assert time.monotonic() - started < DEAD_REPLICA_DEADLINE_S
    assert raised.value.request_ids == ["a"] and raised.value.http_status == 503
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("c", PROMPTS[0], params)
    assert engine.placement["c"] == alive  # the dead replica is out of the router
    engine.abort_request("b")
    texts = {}
    while engine.has_unfinished_requests():
        texts |= {output.request_id: output.outputs[0].text for output in engine.step() if output.finished}
    assert texts == {"c": one.generate([PROMPTS[0]], params)[0].outputs[0].text}

    engine.add_request("d", PROMPTS[1], long)
    engine.step()
    kill_replica(engine, alive)  # the last one: the engine fails
    with pytest.raises(WorkerError, match=rf"replica {alive} \(pid \d+\) exited"):
        for _ in range(400):
            engine.step()
    with pytest.raises(WorkerError):
        engine.step()


def test_the_server_stays_healthy_and_serves_while_a_replica_lives(dp2: LLM) -> None:
    """A request in flight on a replica that dies gets the error; /health answers 200 and the other replica serves;
    once both are gone, requests and /health get 503."""
    engine = dp2.engine
    assert isinstance(engine, DataParallelEngine)
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    async def scenario() -> None:
        app = create_app(engine, ServerSettings())
        async_engine = app.state.engine
        async_engine.start()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
                params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
                stream = await async_engine.add_request("a", PROMPTS[1], params)
                await stream.get()
                dead = engine.placement["a"]
                kill_replica(engine, dead)
                started = time.monotonic()
                with pytest.raises(ReplicaLostError, match="replica"):
                    async with asyncio.timeout(DEAD_REPLICA_DEADLINE_S):
                        while True:
                            await stream.get()
                assert time.monotonic() - started < DEAD_REPLICA_DEADLINE_S
                assert (await http.get("/health")).status_code == 200
                answer = await http.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                kill_replica(engine, 1 - dead)
                failed = await http.post("/v1/completions", json={**body, "max_tokens": 400})
                assert failed.status_code == 503, failed.text
                assert (await http.get("/health")).status_code == 503
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())


def test_dp2_of_tp2_replicas_equals_one_engine_and_a_killed_replica_takes_its_ranks_with_it(
    one_and_dp2: tuple[LLM, LLM], tiny_llama_dir: Path
) -> None:
    """Each replica drives ranks of its own: greedy outputs as one engine's, and a replica killed mid-generation
    fails its request within seconds, its ranks exit (they hear their driver is gone), the other replica serves."""
    one, _ = one_and_dp2
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    llm = LLM(str(tiny_llama_dir), **settings, data_parallel_size=2, tensor_parallel_size=2)
    engine = llm.engine
    assert isinstance(engine, DataParallelEngine)
    try:
        replicas = [psutil.Process(process.pid) for process in engine.links.processes]
        ranks = [replica.children() for replica in replicas]
        assert [len(children) for children in ranks] == [2, 2]
        assert_greedy_close(greedy(one, PROMPTS, 16), greedy(llm, PROMPTS, 16))
        assert engine.placement == {} and engine.loads == [0, 0]
        dead = check_a_lost_replica_fails_its_request_and_the_others_serve(
            engine, one, PROMPTS, lambda index: kill_replica(engine, index), r"replica {} \(pid \d+\) exited"
        )
        _, still_running = psutil.wait_procs(ranks[dead], timeout=DEAD_REPLICA_DEADLINE_S)
        assert still_running == []
        assert all(rank.is_running() for rank in ranks[1 - dead])
    finally:
        engine.shutdown()
    _, still_running = psutil.wait_procs([*replicas, *ranks[1 - dead]], timeout=DEAD_REPLICA_DEADLINE_S)
    assert still_running == []  # shutdown stops each replica, and each replica its ranks


def test_replicas_across_mp_nodes_are_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="nnodes must be 1"):
        LLM(str(tiny_llama_dir), data_parallel_size=2, tensor_parallel_size=2, nnodes=2, master_port=29511)
