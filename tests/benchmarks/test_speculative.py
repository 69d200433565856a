"""`bench spec`: the grounded prompt set hands each reply back under an instruction; the table's speed-ups."""

from __future__ import annotations

from pagedllm.benchmarks.speculative import (
    CODE_INSTRUCTION,
    GROUNDED_INSTRUCTIONS,
    SpecPoint,
    build_requests,
    format_points,
)
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


def test_the_table_reports_speed_ups_over_off_at_each_concurrency() -> None:
    off = SpecPoint("grounded", "off", 2, 102, 10.0, 5.0)  # 100 decode tokens in 5 s
    on = SpecPoint("grounded", "ngram", 2, 102, 5.0, 2.0, 80, 60, 0.75, 3.0)
    # With requests at once the output throughput counts: 800 tokens in 10 s against 12.5 s.
    off_at_once = SpecPoint("grounded", "off", 16, 800, 10.0, 0.0, concurrency=16)
    on_at_once = SpecPoint("grounded", "ngram", 16, 800, 12.5, 0.0, concurrency=16)
    lines = format_points([off, on, off_at_once, on_at_once]).splitlines()
    assert "20.0" in lines[1] and "50.0" in lines[2] and "2.50x" in lines[2] and "75%" in lines[2]
    assert "80.0" in lines[3] and "64.0" in lines[4] and "0.80x" in lines[4]
