"""`bench spec`: the grounded prompt set hands each reply back under an instruction; the table's speed-ups."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

from pagedllm.benchmarks.size_suite import SizeModel
from pagedllm.benchmarks.speculative import (
    CODE_INSTRUCTION,
    COMPLETION_PROMPT,
    CONCURRENT_ROUNDS,
    GROUNDED_INSTRUCTIONS,
    SIZE_MODELS,
    SpecPoint,
    SpecRequest,
    build_requests,
    compare,
    format_points,
    prompt_format_of,
    resolve_spec_model,
)
from pagedllm.spec_decode.speculator import SpecDecodeStats
from tests.benchmarks.conftest import WhitespaceTokenizer


class ChatWhitespaceTokenizer(WhitespaceTokenizer):
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("<user> " + messages[0]["content"] + " <assistant>")


PAIRS = [
    ("what is a cat", " ".join(f"cat{i}" for i in range(40))),
    ("short", "too short to use"),
    ("show code", "```python print(1) ``` " + " ".join(f"w{i}" for i in range(30))),
    ("what is a dog", " ".join(f"dog{i}" for i in range(20))),
]


def test_grounded_requests_contain_the_reply_and_ask_for_about_its_length() -> None:
    tokenizer = ChatWhitespaceTokenizer()
    requests = build_requests(PAIRS, "grounded", 3, tokenizer, seed=0, max_reply_tokens=32)
    assert len(requests) == 3  # the 4-word reply is skipped
    texts = [tokenizer.decode(r.prompt_token_ids) for r in requests]
    for text, request in zip(texts, requests):
        reply = next(reply for _, reply in PAIRS if reply.split()[0] in text)
        kept = reply.split()[:32]
        assert " ".join(kept) in text
        assert request.max_tokens == len(kept) + 16
        assert any(instruction in text for instruction in (*GROUNDED_INSTRUCTIONS, CODE_INSTRUCTION))
    assert any(CODE_INSTRUCTION in text for text in texts)


def test_chat_requests_are_the_questions() -> None:
    tokenizer = ChatWhitespaceTokenizer()
    requests = build_requests(PAIRS, "chat", 2, tokenizer, seed=1, max_reply_tokens=32)
    questions = {tokenizer.decode(r.prompt_token_ids) for r in requests}
    assert questions <= {f"<user> {q} <assistant>" for q, _ in PAIRS}


def test_a_model_without_a_chat_template_gets_the_same_material_as_plain_completion_text() -> None:
    tokenizer = ChatWhitespaceTokenizer()
    for prompt_set in ("chat", "grounded"):
        chat = build_requests(PAIRS, prompt_set, 2, tokenizer, seed=0, max_reply_tokens=32)
        plain = build_requests(PAIRS, prompt_set, 2, tokenizer, seed=0, max_reply_tokens=32, prompt_format="completion")
        assert [r.max_tokens for r in plain] == [r.max_tokens for r in chat]
        for completion, templated in zip(plain, chat):
            text = tokenizer.decode(templated.prompt_token_ids).removeprefix("<user> ").removesuffix(" <assistant>")
            assert completion.prompt_token_ids == tokenizer.encode(COMPLETION_PROMPT.format(text=text))
            assert completion.prompt_token_ids[0] == tokenizer.BOS
    assert prompt_format_of(SimpleNamespace(chat_template=None)) == "completion"
    assert prompt_format_of(SimpleNamespace(chat_template="{{ messages }}")) == "chat"


def test_a_model_of_bench_sizes_is_made_on_first_use_and_named_as_in_its_tables(monkeypatch, tmp_path) -> None:
    made = tmp_path / "base.gguf"
    monkeypatch.setitem(SIZE_MODELS, "base-q4", SizeModel("Base Q4", lambda: made))
    assert resolve_spec_model("base-q4") == (str(made), "Base Q4")
    assert resolve_spec_model(None) == (None, "smollm2-135m-instruct")
    assert resolve_spec_model("/models/other.gguf") == ("/models/other.gguf", "other.gguf")


def test_the_table_reports_speed_ups_over_off_at_each_concurrency() -> None:
    off = SpecPoint("grounded", "off", 2, 102, 10.0, 5.0)  # 100 decode tokens in 5 s
    on = SpecPoint("grounded", "ngram", 2, 102, 5.0, 2.0, 80, 60, 0.75, 3.0)
    # With requests at once the output throughput counts: 800 tokens in 10 s against 12.5 s.
    off_at_once = SpecPoint("grounded", "off", 16, 800, 10.0, 0.0, concurrency=16)
    on_at_once = SpecPoint("grounded", "ngram", 16, 800, 12.5, 0.0, concurrency=16)
    lines = format_points([off, on, off_at_once, on_at_once]).splitlines()
    assert "20.0" in lines[1] and "50.0" in lines[2] and "2.50x" in lines[2] and "75%" in lines[2]
    assert "80.0" in lines[3] and "64.0" in lines[4] and "0.80x" in lines[4]


class FakeLLM:
    """Answers every prompt with its own reversed tokens and logs each call's prompts under its name."""

    def __init__(self, name: str, log: list[tuple[str, int]], drafts: int = 0) -> None:
        self.name, self.log, self.drafts = name, log, drafts
        self.engine = self
        self.counters = SpecDecodeStats()

    def generate(self, prompts, params):
        self.log.append((self.name, len(prompts)))
        self.counters.num_drafts += len(prompts)
        self.counters.num_draft_tokens += self.drafts * len(prompts)
        self.counters.num_accepted_tokens += self.drafts * len(prompts) // 2
        now = time.monotonic()
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=p[::-1])], first_token_time=now) for p in prompts]

    def stats(self):
        return SimpleNamespace(spec_decode=replace(self.counters))


def test_off_and_on_alternate_and_the_counters_cover_the_on_runs() -> None:
    log: list[tuple[str, int]] = []
    requests = [SpecRequest([i, i + 1, i + 2], 8) for i in range(3)]
    off, on = compare(FakeLLM("off", log), FakeLLM("on", log, drafts=4), requests, "grounded", "ngram", False)
    assert log == [("off", 1), ("on", 1)] * 3  # request by request at batch 1
    assert (off.num_requests, off.output_tokens, on.output_tokens) == (3, 9, 9)
    assert (on.draft_tokens, on.accepted_tokens, on.acceptance_rate, on.mean_accepted_length) == (12, 6, 0.5, 3.0)
    assert on.identical_outputs == 3

    log.clear()
    off, on = compare(FakeLLM("off", log), FakeLLM("on", log), requests, "grounded", "ngram", True)
    assert log == [("off", 3), ("on", 3)] * CONCURRENT_ROUNDS  # rounds of all at once
    assert off.concurrency == on.concurrency == 3 and on.identical_outputs == 3
