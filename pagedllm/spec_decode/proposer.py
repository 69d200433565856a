"""Proposers: where draft tokens come from, one interface for every method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from pagedllm.errors import ConfigError
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import propose_ngram
from pagedllm.spec_decode.suffix import SuffixProposer


class Proposer(Protocol):
    """Drafts for a sequence's verified tokens; told when a sequence is done (its output may teach later ones)."""

    def propose(self, key: object, token_ids: Sequence[int], num_tokens: int) -> list[int]: ...

    def finish(self, key: object, output_token_ids: Sequence[int]) -> None: ...


class NgramProposer:
    """Prompt lookup over the sequence's own prompt and output; keeps no state."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, key: object, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        return propose_ngram(np.asarray(token_ids, dtype=np.int64), self.min_n, self.max_n, num_tokens)

    def finish(self, key: object, output_token_ids: Sequence[int]) -> None:
        return None


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer of `config.method` (a draft model is no proposer: it drafts a scheduled batch, DraftModel)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        return SuffixProposer(
            config.suffix_decoding_max_tree_depth,
            config.suffix_decoding_max_cached_requests,
            config.suffix_decoding_max_spec_factor,
            config.suffix_decoding_min_token_prob,
        )
    raise ConfigError(f"speculative_config.method {config.method!r} has no proposer", "method")
