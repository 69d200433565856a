"""Fixtures shared by the benchmark tests."""

from __future__ import annotations

import pytest

from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path


class WhitespaceTokenizer:
    """One token per whitespace-separated word (plus a BOS), so token counts are known by eye."""

    BOS = 1

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab.setdefault(word, len(self.vocab) + 2) for word in text.split()]
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        words = {index: word for word, index in self.vocab.items()}
        return " ".join(words[i] for i in ids if i in words)


@pytest.fixture
def tokenizer() -> WhitespaceTokenizer:
    return WhitespaceTokenizer()


@pytest.fixture(scope="session")
def sharegpt_pairs() -> list[tuple[str, str]]:
    """Every prompt/answer pair of the shipped (truncated) ShareGPT file; reading it takes about 0.5 s."""
    with sharegpt_path() as path:
        return load_sharegpt_pairs(path)
