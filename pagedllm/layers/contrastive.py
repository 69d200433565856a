"""Contrastive search (Su et al. 2022): each token is the one of the model's top-k candidates with the best
(1 - alpha) p(v) - alpha max_j cos(h_v, h_j), h the final-normed last-layer hidden states (what the LM head reads)
of the candidate and of every earlier token of the sequence, prompt included."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ContrastiveState:
    """A sequence's unit-norm hidden states so far, and the candidates the next step scores.

    Invariant: `length` equals the sequence's computed tokens (its K/V in the cache), so a preempted sequence starts
    over with its recomputation (`reset`).
    """

    penalty_alpha: float
    top_k: int
    context: torch.Tensor | None = None  # [capacity, hidden] rows [0, length) in use
    length: int = 0
    candidate_ids: list[int] = field(default_factory=list)
    candidate_probs: torch.Tensor | None = None  # [top_k] their probabilities, in the order of candidate_ids

    def append(self, hidden: torch.Tensor) -> None:
        """Add the final-normed hidden states [rows, hidden] of the next computed tokens."""
        unit = unit_rows(hidden)
        needed = self.length + len(unit)
        if self.context is None or needed > len(self.context):
            grown = torch.empty(max(needed, 2 * self.length), unit.shape[1], dtype=unit.dtype, device=unit.device)
            if self.context is not None:
                grown[: self.length] = self.context[: self.length]
            self.context = grown
        self.context[self.length : needed] = unit
        self.length = needed

    def set_candidates(self, processed_logits: torch.Tensor) -> None:
        """The next step's candidates: the top-k of the softmax of one row's processed logits [vocab]."""
        probs, ids = torch.softmax(processed_logits, dim=-1).topk(self.top_k)
        self.candidate_ids, self.candidate_probs = ids.tolist(), probs

    def choose(self, candidate_hidden: torch.Tensor) -> int:
        """The index of the best candidate, given their final-normed hidden states [top_k, hidden]."""
        assert self.context is not None and self.candidate_probs is not None
        similarity = unit_rows(candidate_hidden) @ self.context[: self.length].T
        scores = contrastive_scores(self.candidate_probs, similarity.max(dim=1).values, self.penalty_alpha)
        return int(scores.argmax())

    def reset(self) -> None:
        self.context, self.length = None, 0
        self.candidate_ids, self.candidate_probs = [], None


def unit_rows(hidden: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, in float32."""
    hidden = hidden.float()
    return hidden / hidden.norm(dim=-1, keepdim=True)


def contrastive_scores(probs: torch.Tensor, degeneration: torch.Tensor, penalty_alpha: float) -> torch.Tensor:
    """Model confidence against degeneration penalty (each candidate's highest cosine to the context)."""
    return (1 - penalty_alpha) * probs - penalty_alpha * degeneration
