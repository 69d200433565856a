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


def test_the_table_reports_decode_speed_up_over_off() -> None:
    off = SpecPoint("grounded", "off", 2, 102, 10.0, 5.0)  # 100 decode tokens in 5 s
    on = SpecPoint("grounded", "ngram", 2, 102, 5.0, 2.0, 80, 60, 0.75, 3.0)
    table = format_points([off, on])
    assert "20.0" in table and "50.0" in table and "2.50x" in table and "75%" in table
