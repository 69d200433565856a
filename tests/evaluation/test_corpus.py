"""The evaluation and calibration corpora: fixed, disjoint ShareGPT record ranges."""

from __future__ import annotations

import json
from pathlib import Path

from pagedllm.evaluation.corpus import CALIBRATION_RECORDS, EVALUATION_RECORDS, sharegpt_turns, token_stream


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
