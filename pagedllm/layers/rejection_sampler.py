"""Lossless verification of draft tokens: accept a prefix of each sequence's drafts, then one more token.

Every sequence contributes k + 1 consecutive rows of target logits: row j scores draft j (j < k) and row k the
bonus token after all k. Greedy rows accept while the draft equals the target's choice. Random rows use rejection
sampling: draft j is accepted with probability min(1, p(d)/q(d)); at the first rejection the token is drawn from
the normalized max(p - q, 0), and when all are accepted the bonus is drawn from p. The emitted tokens are then
distributed exactly as if drawn from p one at a time. p is the target under the request's own settings (the
sampler's processing); q is the draft's distribution.

Drafts without a distribution (n-gram and suffix proposals) have a one-hot q: accept d with probability p(d), else
draw from p without d. That is done by coupling: each position draws the token the sampler would draw there, with
the same noise from the same generator, and the draft is accepted when it is that token. A seeded request thus
emits the very tokens it would emit without speculation, whatever was proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.layers.sampler import Sampler, SamplingBatch, first_max_index, process_logits, with_logprobs


@dataclass
class DraftBatch:
    """The drafts being verified: sequence i owns num_draft_tokens[i] + 1 rows, in order."""

    num_draft_tokens: list[int]
    draft_token_ids: list[int]  # all sequences' drafts, concatenated
    draft_probs: torch.Tensor | None = None  # [len(draft_token_ids), vocab] the drafts' distributions; None: one-hot

    def first_rows(self) -> list[int]:
        """Each sequence's first row."""
        starts, row = [], 0
        for k in self.num_draft_tokens:
            starts.append(row)
            row += k + 1
        return starts


@dataclass
class VerifiedTokens:
    """Per sequence: its accepted drafts followed by one token of the target's; logprobs per emitted token."""

    token_ids: list[list[int]]
    token_logprobs: list[list[float]] | None
    top_ids: list[list[list[int]]] | None
    top_logprobs: list[list[list[float]]] | None

    @property
    def num_accepted(self) -> list[int]:
        return [len(tokens) - 1 for tokens in self.token_ids]


class RejectionSampler:
    """Verifies drafts against target logits; shares the sampler's draws and its engine-wide generator."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, drafts: DraftBatch) -> VerifiedTokens:
        """logits: float32 [rows, vocab] raw target logits; `batch` has one row per logits row."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
        target = process_logits(logits, batch)
        choices = first_max_index(target.logits)
        draft_rows = [first + j for first, k in zip(drafts.first_rows(), drafts.num_draft_tokens) for j in range(k)]
        drafted = torch.tensor(drafts.draft_token_ids, dtype=torch.int64, device=logits.device)
        accepted = (choices[draft_rows] == drafted).tolist() if draft_rows else []
        random = set(target.random_rows)
        probs = torch.softmax(target.logits[target.random_rows], dim=-1) if random else None
        prob_row = {row: index for index, row in enumerate(target.random_rows)}
        emitted: list[list[int]] = []
        rows: list[list[int]] = []
        draft_index = 0
        for first, k in zip(drafts.first_rows(), drafts.num_draft_tokens):
            tokens = drafts.draft_token_ids[draft_index : draft_index + k]
            if first in random:
                assert probs is not None
                row_probs = probs[[prob_row[first + j] for j in range(k + 1)]]
                q = drafts.draft_probs[draft_index : draft_index + k] if drafts.draft_probs is not None else None
                tokens = self._verify_random(row_probs, tokens, q, batch.generators[first])
            else:
                num = _accepted_prefix(accepted[draft_index : draft_index + k])
                tokens = tokens[:num] + [int(choices[first + num])]
            draft_index += k
            emitted.append(tokens)
            rows.append(list(range(first, first + len(tokens))))
        return _verified(emitted, rows, raw_logprobs, batch.num_logprobs)

    def _verify_random(
        self,
        probs: torch.Tensor,
        drafts: list[int],
        draft_probs: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> list[int]:
        """One sequence's rejection sampling: probs [k + 1, vocab] target, draft_probs [k, vocab] or None (one-hot)."""
        if draft_probs is None:
            return self._verify_by_coupling(probs, drafts, generator)
        k = len(drafts)
        index = torch.arange(k, device=probs.device)
        drafted = torch.tensor(drafts, dtype=torch.int64, device=probs.device)
        p, q = probs[index, drafted], draft_probs[index, drafted]
        uniform = torch.rand(k, generator=generator or self.sampler.generator, device=probs.device)
        num = _accepted_prefix((uniform * q <= p).tolist())
        if num == k:
            residual = probs[k]
        else:
            residual = (probs[num] - draft_probs[num]).clamp_(min=0)
            if not bool(residual.sum() > 0):
                residual = probs[num]  # p == q: a rejection has probability 0; kept for rounding's sake
        last = self.sampler.draw((residual / residual.sum()).unsqueeze(0), [generator])
        return drafts[:num] + [int(last[0])]

    def _verify_by_coupling(
        self, probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None
    ) -> list[int]:
        """One-hot drafts: draw each position's token as the sampler would, until one differs from its draft."""
        emitted: list[int] = []
        for j in range(len(drafts) + 1):
            token = int(self.sampler.draw(probs[j : j + 1], [generator])[0])
            emitted.append(token)
            if j == len(drafts) or token != drafts[j]:
                return emitted
        return emitted


def _accepted_prefix(accepted: list[bool]) -> int:
    """Length of the leading run of accepted drafts."""
    for index, ok in enumerate(accepted):
        if not ok:
            return index
    return len(accepted)


def _verified(
    emitted: list[list[int]], rows: list[list[int]], raw_logprobs: torch.Tensor | None, num_logprobs: int
) -> VerifiedTokens:
    """Attach each emitted token's raw logprob and its row's top ones, as the sampler reports them."""
    if raw_logprobs is None:
        return VerifiedTokens(emitted, None, None, None)
    flat_rows = [row for seq_rows in rows for row in seq_rows]
    flat_tokens = torch.tensor([t for tokens in emitted for t in tokens], dtype=torch.int64)
    flat = with_logprobs(flat_tokens, raw_logprobs[flat_rows], num_logprobs)
    assert flat.token_logprobs is not None and flat.top_ids is not None and flat.top_logprobs is not None
    token_logprobs, top_ids, top_logprobs = [], [], []
    start = 0
    for tokens in emitted:
        end = start + len(tokens)
        token_logprobs.append(flat.token_logprobs[start:end])
        top_ids.append(flat.top_ids[start:end])
        top_logprobs.append(flat.top_logprobs[start:end])
        start = end
    return VerifiedTokens(emitted, token_logprobs, top_ids, top_logprobs)
