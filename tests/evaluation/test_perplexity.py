"""Perplexity through the engine against a plain full-context forward of the same tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedllm import LLM
from pagedllm.cli import main
from pagedllm.evaluation.corpus import PromptReply
from pagedllm.evaluation.perplexity import (
    Window,
    perplexity,
    reply_perplexity,
    sliding_windows,
    streaming_perplexity,
)
from pagedllm.model.loader import load_checkpoint
from pagedllm.quantize.dense_model import forward_logits

NUM_TOKENS = 45


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir: Path) -> LLM:
    # A small step budget splits each window into prefill chunks that read earlier ones back from the cache.
    return LLM(
        str(tiny_llama_dir),
        dtype="float32",
        kv_cache_memory=2**22,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    return torch.randint(0, 49152, (NUM_TOKENS,), generator=torch.Generator().manual_seed(3)).tolist()


def direct_nll(folder: Path, token_ids: list[int], windows: list[Window]) -> float:
    """Summed NLL of each window's scored tokens from one full-context forward over that window alone."""
    checkpoint = load_checkpoint(folder, torch.float32)
    total = 0.0
    for w in windows:
        logits = forward_logits(checkpoint.config, checkpoint.weights, torch.tensor([token_ids[w.begin : w.end]]))[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        for position in range(w.first_scored, w.end):
            total -= logprobs[position - 1 - w.begin, token_ids[position]].item()
    return total


def test_whole_text_window_equals_exp_mean_nll(tiny_llm: LLM, tiny_llama_dir: Path, token_ids: list[int]) -> None:
    result = perplexity(tiny_llm, token_ids, window=64, stride=64)
    expected_nll = direct_nll(tiny_llama_dir, token_ids, [Window(0, NUM_TOKENS, 1)]) / (NUM_TOKENS - 1)
    assert result.tokens_scored == NUM_TOKENS - 1 and result.windows == 1
    assert result.mean_nll == pytest.approx(expected_nll, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected_nll), rel=1e-4)


def test_strided_windows_match_direct_computation(tiny_llm: LLM, tiny_llama_dir: Path, token_ids: list[int]) -> None:
    windows = sliding_windows(NUM_TOKENS, 20, 8)
    result = perplexity(tiny_llm, token_ids, window=20, stride=8)
    expected_nll = direct_nll(tiny_llama_dir, token_ids, windows) / (NUM_TOKENS - 1)
    assert result.windows == len(windows) > 1
    assert result.mean_nll == pytest.approx(expected_nll, rel=1e-4)
    # Less context per prediction than one whole-text window: a different number.
    whole = perplexity(tiny_llm, token_ids, window=64, stride=64)
    assert result.mean_nll != pytest.approx(whole.mean_nll, rel=1e-6)


@given(st.integers(2, 300), st.integers(2, 64), st.data())
def test_every_token_but_the_first_is_scored_once(num_tokens: int, window: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, window))
    windows = sliding_windows(num_tokens, window, stride)
    scored = [p for w in windows for p in range(w.first_scored, w.end)]
    assert scored == list(range(1, num_tokens))
    for w in windows:
        assert w.begin <= w.first_scored and w.end - w.begin <= window
    assert windows[-1].end == num_tokens


def test_bad_window_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        sliding_windows(10, 8, 9)
    with pytest.raises(ValueError):
        sliding_windows(1, 8, 4)


def test_cli_scores_a_text_file_and_writes_json(
    tiny_llm: LLM, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The paged cache keeps every block of keys and values once. " * 4, encoding="utf-8")
    output = tmp_path / "result.json"
    argv = [
        "eval",
        "perplexity",
        "--model",
        str(tiny_llama_dir),
        "--text",
        str(text),
        "--window",
        "32",
        "--stride",
        "16",
    ]
    assert main([*argv, "--kv-cache-memory", str(2**22), "--output-json", str(output), "--variant", "tiny"]) == 0
    document = json.loads(output.read_text())["runs"][0]
    num_tokens = len(tiny_llm.tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False))
    assert document["kind"] == "perplexity"
    assert document["results"]["tokens_scored"] == num_tokens - 1
    assert document["results"]["perplexity"] == pytest.approx(math.exp(document["results"]["mean_nll"]))
    assert document["settings"]["window"] == 32 and document["settings"]["enable_prefix_caching"] is False
    assert document["settings"]["variant"] == "tiny"
    assert "perplexity" in capsys.readouterr().out


def test_streaming_evaluation_decodes_token_by_token_and_reports_peak_blocks(
    tiny_llm: LLM, tiny_llama_dir: Path, token_ids: list[int], tmp_path: Path
) -> None:
    settings = dict(dtype="float32", kv_cache_memory=2**22, enable_prefix_caching=False, block_size=4)
    streaming = dict(kv_cache_policy="streaming", attention_sinks=2, max_num_batched_tokens=1)
    # A window longer than the text keeps every token: full attention, one token at a time.
    whole = streaming_perplexity(LLM(str(tiny_llama_dir), **settings, **streaming, kv_window=64), token_ids)
    expected = perplexity(tiny_llm, token_ids, window=64, stride=64)
    assert whole.mean_nll == pytest.approx(expected.mean_nll, rel=1e-4)
    assert whole.peak_kv_blocks == -(-NUM_TOKENS // 4)
    windowed = streaming_perplexity(LLM(str(tiny_llama_dir), **settings, **streaming, kv_window=8), token_ids)
    assert windowed.tokens_scored == NUM_TOKENS - 1
    assert windowed.peak_kv_blocks == -(-(2 + 8) // 4) + 1 < whole.peak_kv_blocks
    assert windowed.mean_nll != pytest.approx(whole.mean_nll, rel=1e-6)


def test_cli_streaming_policy_flags(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The window keeps the sinks and the most recent tokens. " * 8, encoding="utf-8")
    output = tmp_path / "result.json"
    argv = ["eval", "perplexity", "--model", str(tiny_llama_dir), "--text", str(text), "--kv-cache-memory", str(2**22)]
    policy = ["--kv-cache-policy", "streaming", "--kv-window", "16", "--attention-sinks", "4", "--block-size", "4"]
    assert main([*argv, *policy, "--output-json", str(output)]) == 0
    document = json.loads(output.read_text())["runs"][0]
    assert document["settings"]["kv_cache_policy"] == "streaming" and document["settings"]["kv_window"] == 16
    assert document["settings"]["max_num_batched_tokens"] == 1
    assert document["results"]["peak_kv_blocks"] == 6
    assert "4 sinks + window 16, token by token" in capsys.readouterr().out


def test_long_answer_evaluation_scores_reply_tokens_only_one_record_at_a_time(
    tiny_llm: LLM, tiny_llama_dir: Path, token_ids: list[int]
) -> None:
    records = [PromptReply(token_ids[:30], 10), PromptReply(token_ids[5:45], 25)]
    result = reply_perplexity(tiny_llm, records)
    expected_nll = sum(
        direct_nll(tiny_llama_dir, r.token_ids, [Window(0, len(r.token_ids), r.prompt_len)]) for r in records
    )
    assert result.tokens_scored == 20 + 15 and result.windows == 2
    assert result.mean_nll == pytest.approx(expected_nll / 35, rel=1e-4)
    settings = dict(
        dtype="float32", kv_cache_memory=2**22, enable_prefix_caching=False, block_size=4, max_num_batched_tokens=1
    )
    # A budget above every record's length keeps every token: the same numbers, one token per step.
    whole = reply_perplexity(LLM(str(tiny_llama_dir), **settings, kv_cache_policy="h2o", kv_budget=48), records)
    assert whole.mean_nll == pytest.approx(result.mean_nll, rel=1e-4)
    small = reply_perplexity(LLM(str(tiny_llama_dir), **settings, kv_cache_policy="h2o", kv_budget=8), records)
    # One record's blocks at a time, bounded by the budget: ceil(8 / 4) + 1.
    assert small.peak_kv_blocks == 3 < whole.peak_kv_blocks == 10
    assert small.mean_nll != pytest.approx(whole.mean_nll, rel=1e-6)


def test_cli_long_answer_task_under_h2o(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "result.json"
    argv = ["eval", "perplexity", "--model", str(tiny_llama_dir), "--kv-cache-memory", str(2**22)]
    task = ["--dataset", "sharegpt-long-replies", "--num-records", "1", "--max-tokens", "48"]
    policy = ["--kv-cache-policy", "h2o", "--kv-budget", "16", "--block-size", "4"]
    assert main([*argv, *task, *policy, "--output-json", str(output)]) == 0
    document = json.loads(output.read_text())["runs"][0]
    settings = document["settings"]
    assert settings["kv_cache_policy"] == "h2o" and settings["kv_budget"] == 16 and settings["num_records"] == 1
    assert settings["corpus"] == "sharegpt-long-replies" and settings["max_num_batched_tokens"] == 1
    assert 36 <= document["results"]["tokens_scored"] < 48  # the prompt takes at most a quarter of the record
    assert document["results"]["peak_kv_blocks"] == 5
    assert "h2o: budget 16, token by token" in capsys.readouterr().out
