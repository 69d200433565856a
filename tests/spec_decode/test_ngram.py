"""Prompt lookup: longest n first, the latest earlier occurrence, bounded by the sequence's end."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.spec_decode.ngram import propose_ngram


def ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


def reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition, by brute force over every n and every earlier start."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == suffix]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_proposes_what_followed_the_latest_occurrence() -> None:
    # "1 2" occurs at 0 (then 3) and at 4 (then 9): the latest wins.
    assert propose_ngram(ids(1, 2, 3, 4, 1, 2, 9, 8, 7, 1, 2), 2, 3, 3) == [9, 8, 7]


def test_longer_match_wins_over_a_later_shorter_one() -> None:
    # The 3-gram "5 1 2" occurs once (then 3); the 2-gram "1 2" occurs later (then 9).
    tokens = ids(5, 1, 2, 3, 3, 1, 2, 9, 5, 1, 2)
    assert propose_ngram(tokens, 2, 3, 2) == [3, 3]
    assert propose_ngram(tokens, 2, 2, 2) == [9, 5]


def test_no_match_and_short_sequences_propose_nothing() -> None:
    assert propose_ngram(ids(1, 2, 3, 4), 1, 3, 4) == []
    assert propose_ngram(ids(7), 1, 3, 4) == []


def test_drafts_stop_at_the_end_of_the_sequence() -> None:
    # A period-1 repetition: the latest earlier "7 7" ends one before the end, so one token follows it.
    assert propose_ngram(ids(7, 7, 7), 2, 2, 5) == [7]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=40),
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(1, 6),
)
def test_matches_the_brute_force_definition(tokens: list[int], min_n: int, extra: int, k: int) -> None:
    assert propose_ngram(np.array(tokens), min_n, min_n + extra, k) == reference(tokens, min_n, min_n + extra, k)
