"""The evaluation and calibration corpora: fixed, disjoint ShareGPT record ranges."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm.errors import InvalidArgumentError
from pagedllm.evaluation import corpus
from pagedllm.evaluation.corpus import (
    CALIBRATION_RECORDS,
    EVALUATION_RECORDS,
    long_reply_records,
    sharegpt_exchanges,
    sharegpt_turns,
    token_stream,
)


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_record_ranges_are_disjoint() -> None:
    assert not set(CALIBRATION_RECORDS) & set(EVALUATION_RECORDS)


def test_turns_come_from_the_requested_records_and_speaker(tmp_path: Path) -> None:
    records = [
        {
            "conversations": [
                {"from": "human", "value": f"q{i}"},
                {"from": "gpt", "value": f"a{i}"},
                {"from": "gpt", "value": " "},
            ]
        }
        for i in range(6)
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    assert list(sharegpt_turns(path, "gpt", range(2, 4))) == ["a2", "a3"]
    assert list(sharegpt_turns(path, "human", range(0, 2))) == ["q0", "q1"]
    assert list(sharegpt_turns(path, None, range(4, 6))) == ["q4", "a4", "q5", "a5"]


def test_token_stream_joins_turns_and_stops_at_the_count() -> None:
    ids = token_stream(iter(["ab", "cd", "ef"]), CharTokenizer(), 7)
    assert CharTokenizer().decode(ids) == "ab\n\ncd\n"
    assert token_stream(iter(["ab"]), CharTokenizer(), 100) == [ord("a"), ord("b"), 10, 10]


def exchanges_file(tmp_path: Path) -> Path:
    records = [
        {"conversations": [{"from": "human", "value": "long question " * 9}, {"from": "gpt", "value": "x" * 90}]},
        {"conversations": [{"from": "gpt", "value": "a reply to nothing " * 9}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "short"}]},
        {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "y" * 100}]},
        {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "z" * 80}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    return path


def test_exchanges_pair_each_human_turn_with_the_reply_after_it(tmp_path: Path) -> None:
    pairs = list(sharegpt_exchanges(exchanges_file(tmp_path), range(1, 5)))
    assert pairs == [("q", "short"), ("q1", "y" * 100), ("q2", "z" * 80)]


def test_long_reply_records_keep_short_prompts_with_replies_that_fill_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = exchanges_file(tmp_path)

    @contextlib.contextmanager
    def shipped() -> Iterator[Path]:
        yield path

    monkeypatch.setattr(corpus, "sharegpt_path", shipped)
    monkeypatch.setattr(corpus, "EVALUATION_RECORDS", range(0, 5))
    # 40 tokens: the first prompt is too long (128 tokens > 10), the third reply too short; the fourth and fifth fit.
    records = long_reply_records(CharTokenizer(), 2, 40)
    assert [CharTokenizer().decode(r.token_ids) for r in records] == ["q1\n\n" + "y" * 36, "q2\n\n" + "z" * 36]
    assert [r.prompt_len for r in records] == [4, 4]
    with pytest.raises(InvalidArgumentError, match="only 2 exchanges"):
        long_reply_records(CharTokenizer(), 3, 40)
