"""The ShareGPT reader (complete records only), the seeded sampling and the random dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedllm.benchmarks.datasets import (
    BenchmarkRequest,
    TruncatedJSONError,
    first_exchange,
    iter_json_array_records,
    load_sharegpt_pairs,
    random_requests,
    sample_sharegpt_requests,
)

RECORDS = [
    {
        "id": "a",
        "conversations": [
            {"from": "human", "value": "one two three four five"},
            {"from": "gpt", "value": "six seven eight nine ten"},
        ],
    },
    {
        "id": "b",
        "conversations": [
            {"from": "human", "value": 'quote " and \\\\ backslash \\u00e9 é 😀'},
            {"from": "gpt", "value": "x"},
        ],
        "n": -1.5e3,
    },
    {"id": "c", "flags": [True, False, None], "conversations": [{"from": "gpt", "value": "a model turn first"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "🙂 " * 10}, {"from": "gpt", "value": "w " * 30}]},
]


def write_array(path: Path, records: list[dict]) -> str:
    text = json.dumps(records, indent=2, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return text


def test_reads_a_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "full.json"
    write_array(path, RECORDS)
    assert list(iter_json_array_records(path, chunk_chars=7)) == RECORDS


def test_every_cut_yields_exactly_the_records_before_it(tmp_path: Path) -> None:
    """Cut the file at every character: the reader returns the records that end before the cut, never a partial one."""
    text = json.dumps(RECORDS, indent=1, ensure_ascii=False)
    # Where each record's JSON ends in the text; a record is complete when the cut falls after its end.
    ends, search_from = [], 0
    for record in RECORDS:
        encoded = json.dumps(record, indent=1, ensure_ascii=False).replace("\n", "\n ")
        start = text.index(encoded, search_from)
        ends.append(start + len(encoded))
        search_from = ends[-1]
    path = tmp_path / "cut.json"
    for cut in range(1, len(text)):
        path.write_text(text[:cut], encoding="utf-8")
        expected = [record for record, end in zip(RECORDS, ends, strict=True) if end <= cut]
        for chunk_chars in (5, 64, 1 << 20):
            assert list(iter_json_array_records(path, chunk_chars)) == expected, (cut, chunk_chars)


def test_cut_inside_a_multibyte_character(tmp_path: Path) -> None:
    encoded = json.dumps(RECORDS, ensure_ascii=False).encode()
    cut = encoded.index("😀".encode()) + 2
    path = tmp_path / "bytes.json"
    path.write_bytes(encoded[:cut])
    assert list(iter_json_array_records(path, chunk_chars=16)) == RECORDS[:1]


def test_malformed_record_before_the_end_is_an_error(tmp_path: Path) -> None:
    text = json.dumps(RECORDS, indent=2).replace('"id": "b"', '"id": b', 1)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TruncatedJSONError):
        list(iter_json_array_records(path, chunk_chars=16))


@pytest.mark.parametrize("text", ['{"not": "an array"}', "[1, 2]", ""])
def test_not_an_array_of_objects_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.json"
    path.write_text(text)
    with pytest.raises(TruncatedJSONError):
        list(iter_json_array_records(path))


def test_first_exchange_pairs_the_first_human_turn_with_the_answer_after_it() -> None:
    turns = [
        {"from": "gpt", "value": "hi"},
        {"from": "human", "value": " "},
        {"from": "human", "value": "q1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": ""},
        {"from": "gpt", "value": "a"},
    ]
    assert first_exchange(turns) == ("q1", "a")
    assert first_exchange([{"from": "human", "value": "q"}]) is None
    assert first_exchange([]) is None


def test_load_pairs_from_a_small_file(tmp_path: Path) -> None:
    path = tmp_path / "small.json"
    write_array(path, RECORDS)
    assert [prompt.split()[0] for prompt, _ in load_sharegpt_pairs(path)] == ["one", "quote", "🙂"]


def test_shipped_file_reads_complete_conversations(sharegpt_pairs: list[tuple[str, str]]) -> None:
    # The shipped file is cut at 125 MB after about 17,600 conversations; almost all have a first exchange.
    assert 17_000 < len(sharegpt_pairs) < 17_700
    assert all(prompt.strip() and answer.strip() for prompt, answer in sharegpt_pairs)


def test_sampling_is_reproducible_and_respects_the_context(sharegpt_pairs: list[tuple[str, str]], tokenizer) -> None:
    first = sample_sharegpt_requests(sharegpt_pairs, 300, tokenizer, max_model_len=512, seed=7)
    again = sample_sharegpt_requests(sharegpt_pairs, 300, tokenizer, max_model_len=512, seed=7)
    other = sample_sharegpt_requests(sharegpt_pairs, 300, tokenizer, max_model_len=512, seed=8)
    assert first == again
    assert first != other
    assert len(first) == 300
    for request in first:
        assert request.prompt_len + request.output_len <= 512
        assert request.prompt_len >= 4 and request.output_len >= 4
        assert request.prompt_len == len(tokenizer.encode(request.prompt))


def test_sampling_counts_answers_without_special_tokens(tokenizer) -> None:
    pairs = [("a b c d", "e f g h"), ("a b", "c d e f"), ("a b c d", "e f g")]
    requests = sample_sharegpt_requests(pairs, 1, tokenizer, max_model_len=9, seed=0)
    # 4 words + BOS in the prompt, 4 words in the answer; the other pairs are too short.
    assert requests == [BenchmarkRequest("a b c d", 5, 4)]


def test_sampling_fails_when_too_few_conversations_fit(tokenizer) -> None:
    pairs = [("a b c d", "e f g h")] * 3
    with pytest.raises(ValueError, match="only 0 of 3"):
        sample_sharegpt_requests(pairs, 1, tokenizer, max_model_len=8, seed=0)
    with pytest.raises(ValueError, match="only 3 of 3"):
        sample_sharegpt_requests(pairs, 4, tokenizer, max_model_len=9, seed=0)
    assert len(sample_sharegpt_requests(pairs, 3, tokenizer, max_model_len=9, seed=0)) == 3


def test_random_requests() -> None:
    requests = random_requests(5, input_len=16, output_len=8, vocab_size=50, seed=3, excluded_ids=frozenset({0, 1, 2}))
    assert requests == random_requests(5, 16, 8, 50, 3, frozenset({0, 1, 2}))
    assert requests != random_requests(5, 16, 8, 50, 4, frozenset({0, 1, 2}))
    for request in requests:
        assert isinstance(request.prompt, list) and len(request.prompt) == request.prompt_len == 16
        assert request.output_len == 8
        assert all(3 <= token < 50 for token in request.prompt)


def test_sharegpt_output_len_replaces_the_answer_length(tokenizer) -> None:
    pairs = [("a b c d", "e f g h"), ("a b c d e f", "g"), ("a b", "c d e f g h i j")]
    # Prompts of 5, 7 and 3 tokens (too short): only the first fits 7 with 2 output tokens; a 1-word answer is fine.
    with pytest.raises(ValueError, match="only 1 of 3"):
        sample_sharegpt_requests(pairs, 2, tokenizer, max_model_len=7, seed=0, output_len=2)
    requests = sample_sharegpt_requests(pairs, 2, tokenizer, max_model_len=9, seed=0, output_len=2)
    assert sorted(requests, key=lambda r: r.prompt_len) == [
        BenchmarkRequest("a b c d", 5, 2),
        BenchmarkRequest("a b c d e f", 7, 2),
    ]
    # Without the cap the answers' own lengths count: "g" is too short, and "e f g h" makes 5 + 4 = 9.
    assert sample_sharegpt_requests(pairs, 1, tokenizer, max_model_len=9, seed=0) == [BenchmarkRequest("a b c d", 5, 4)]
