"""`pagedllm bench prefix`: real-text shared system prompts, and caching measured from the engine's own counters."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagedllm.benchmarks import prefix_sharing


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prefix_sharing.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_chats_share_one_system_prompt_of_about_the_asked_size(sharegpt_pairs, tokenizer) -> None:
    chats = prefix_sharing.shared_prefix_chats(sharegpt_pairs, tokenizer, 300, 5, seed=1)
    systems = {chat[0]["content"] for chat in chats}
    assert len(systems) == 1
    system_len = len(tokenizer.encode(systems.pop(), add_special_tokens=False))
    assert 270 <= system_len <= 300
    questions = [chat[1]["content"] for chat in chats]
    assert len(set(questions)) == 5
    assert all(chat[1]["role"] == "user" for chat in chats)


def test_cached_run_computes_only_the_new_tail(tiny_llama_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    args = parse(
        "--model", str(tiny_llama_dir), "--system-prompt-tokens", "200", "--num-requests", "3", "--max-tokens", "2",
        "--kv-cache-memory", str(2**22), "--output-json", str(output),
    )  # fmt: skip
    assert prefix_sharing.run(args) == 0
    (run,) = json.loads(output.read_text())["runs"]
    assert run["kind"] == "prefix"
    record = run["results"]
    for mode in ("cached", "uncached"):
        for request in record[f"{mode}_requests"]:
            assert request["computed_prefill_tokens"] + request["cache_hit_tokens"] == request["prompt_tokens"]
    assert all(r["cache_hit_tokens"] == 0 for r in record["uncached_requests"])
    assert record["cached_requests"][0]["cache_hit_tokens"] == 0
    assert all(r["cache_hit_tokens"] >= 200 - 16 for r in record["cached_requests"][1:])
    cached, uncached = record["cached_summary"], record["uncached_summary"]
    assert record["prefill_tokens_drop"] == 1 - cached["computed_prefill_tokens"] / uncached["computed_prefill_tokens"]
    assert record["prefill_tokens_drop"] > 0.4
