"""Per-sequence grammar state during generation: the batch's allowed-token bitmask before each draw, and each
drawn token fed back to its sequence's matcher."""

from __future__ import annotations

import logging
import weakref

import llguidance
import torch

from pagedllm.engine.request import Sequence
from pagedllm.structured_output.backend import GrammarBackend

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    """Owns one matcher per constrained sequence (dropped with the sequence) and the executor filling masks."""

    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._matchers: weakref.WeakKeyDictionary[Sequence, llguidance.LLMatcher] = weakref.WeakKeyDictionary()
        self._executor: llguidance.LLExecutor | None = None

    def _matcher(self, seq: Sequence) -> llguidance.LLMatcher | None:
        params = seq.request.params.structured_outputs
        if params is None:
            return None
        matcher = self._matchers.get(seq)
        if matcher is None:
            # Samples forked off a request start before their first token, at the grammar's start.
            matcher = self.backend.new_matcher(params)
            self._matchers[seq] = matcher
        return matcher

    def bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """[rows, ceil(vocab / 32)] int32 bits of the tokens each row may draw (all ones when unconstrained), or
        None when no row is constrained."""
        pairs = [(matcher, row) for row, seq in enumerate(seqs) if (matcher := self._matcher(seq)) is not None]
        if not pairs:
            return None
        words = (self.backend.vocab_size + 31) // 32
        mask = torch.full((len(seqs), words), -1, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(pairs, mask.data_ptr(), words * 4, len(seqs))
        return mask

    def accept(self, seq: Sequence, token_id: int) -> bool:
        """Advance the sequence's matcher by its drawn token; True when its grammar is complete (or broken)."""
        matcher = self._matchers.get(seq)
        if matcher is None:
            return False
        if not matcher.consume_token(token_id):
            error = matcher.get_error()
            logger.warning("request %s: token %d rejected by its grammar: %s", seq.request.request_id, token_id, error)
            return True
        return matcher.is_stopped()
