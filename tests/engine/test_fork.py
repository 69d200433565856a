"""Kept requests and forks: the engine API that searches above the core (beam search) are built on."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.engine import LLMEngine
from pagedllm.errors import InvalidArgumentError

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLM(model=str(tiny_llama_dir), kv_cache_memory=2**22, block_size=4).engine


def run(engine: LLMEngine) -> dict[str, list[int]]:
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return finished


@pytest.mark.parametrize("prompt_len", [8, 10])  # the fork starts on a block boundary, and inside a shared block
def test_a_fork_continues_from_the_kept_prompt_as_a_plain_request_would(engine: LLMEngine, prompt_len: int) -> None:
    free_before = engine.block_manager.num_free_blocks
    prompt = list(range(40, 40 + prompt_len))
    engine.add_request("source", prompt, SamplingParams(max_tokens=1, **GREEDY), keep_kv=True)
    run(engine)
    kept = engine.kept["source"]
    assert len(kept.block_ids) == -(-prompt_len // 4)  # the prompt's blocks stay after the request finished
    engine.fork_request("source", "a", [7, 8], SamplingParams(max_tokens=5, **GREEDY))
    engine.fork_request("source", "b", [9], SamplingParams(max_tokens=5, **GREEDY))
    assert engine.requests["a"].sequences[0].block_ids[: prompt_len // 4] == kept.block_ids[: prompt_len // 4]
    engine.release_request("source")
    forks = run(engine)
    engine.add_request("plain-a", prompt + [7, 8], SamplingParams(max_tokens=5, **GREEDY))
    engine.add_request("plain-b", prompt + [9], SamplingParams(max_tokens=5, **GREEDY))
    plain = run(engine)
    assert forks == {"a": plain["plain-a"], "b": plain["plain-b"]}
    assert engine.block_manager.num_free_blocks == free_before


def test_forks_share_the_prompts_blocks_and_copy_the_partial_one(engine: LLMEngine) -> None:
    engine.add_request("source", list(range(60, 70)), SamplingParams(max_tokens=1, **GREEDY), keep_kv=True)
    run(engine)
    source_blocks = list(engine.kept["source"].block_ids)  # two full blocks of 4 and a partial one of 2
    engine.fork_request("source", "a", [1], SamplingParams(max_tokens=3, **GREEDY))
    engine.fork_request("source", "b", [2], SamplingParams(max_tokens=3, **GREEDY))
    ref_counts = engine.block_manager.allocator.ref_counts
    assert [ref_counts[block_id] for block_id in source_blocks] == [3, 3, 3]
    engine.step()  # each fork writes its token into the partial block: into a copy of its own
    a, b = (engine.requests[r].sequences[0].block_ids for r in ("a", "b"))
    assert a[:2] == b[:2] == source_blocks[:2]
    assert len({a[2], b[2], source_blocks[2]}) == 3
    assert [ref_counts[block_id] for block_id in source_blocks] == [3, 3, 1]
    engine.release_request("source")
    run(engine)
    assert all(ref_counts[block_id] == 0 for block_id in source_blocks)


def test_fork_and_keep_misuse_is_rejected(engine: LLMEngine) -> None:
    with pytest.raises(InvalidArgumentError, match="not kept"):
        engine.fork_request("nobody", "x", [1], SamplingParams())
    with pytest.raises(InvalidArgumentError, match="n=1"):
        engine.add_request("many", [1, 2, 3], SamplingParams(n=2), keep_kv=True)
    assert not engine.has_unfinished_requests()
