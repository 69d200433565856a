"""Beam search as transformers' `generate(num_beams=k, do_sample=False)` does it: which continuations of the live
beams survive a step, which become finished hypotheses, and when the search is over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from pagedllm.engine.request import FinishReason, Request, Sequence
from pagedllm.model.tokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams


class Beam(Protocol):
    """A live beam's history (a Sequence)."""

    output_token_ids: list[int]
    logprobs: list[dict[int, float]]
    cumulative_logprob: float


@dataclass
class Continuation:
    """A live beam extended by one token: the next step's beam."""

    parent: int  # index of the extended beam in the list passed to `step`
    token_id: int
    cumulative_logprob: float
    logprobs: dict[int, float] | None


@dataclass
class Hypothesis:
    """A finished beam, ranked by its length-penalized score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    logprobs: list[dict[int, float]]
    finish_reason: FinishReason


@dataclass
class BeamStep:
    continuations: list[Continuation]  # the next live beams, best first
    done: bool


@dataclass
class BeamSearch:
    """One request's search state: its best finished hypotheses and whether live beams may still beat them.

    Each step takes the top max(2, 1 + #stop tokens) * width candidates of (beam score + token logprob) over all
    beams; a candidate that ends its beam becomes a hypothesis only if it ranks among the first `width`; the best
    `width` others live on. Scores are summed in float32 exactly as transformers does, so rankings agree.
    """

    width: int
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int
    min_tokens: int
    stop_token_ids: frozenset[int]
    num_logprobs: int | None
    hypotheses: list[Hypothesis] = field(default_factory=list)
    improvable: bool = True
    pending: dict[object, torch.Tensor] = field(default_factory=dict)  # beam -> this step's logprobs row
    num_beams_created: int = 1

    @classmethod
    def for_params(cls, params: SamplingParams, eos_token_ids: frozenset[int]) -> BeamSearch:
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        assert params.beam_width is not None
        return cls(
            width=params.beam_width,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            max_new_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop_token_ids=stops,
            num_logprobs=params.logprobs,
        )

    def step(self, beams: list[Beam], logprobs: torch.Tensor) -> BeamStep:
        """Advance every live beam by one token; `logprobs` [beams, vocab] is the float32 log-softmax of each."""
        num_generated = len(beams[0].output_token_ids) + 1
        if num_generated <= self.min_tokens and self.stop_token_ids:
            logprobs = logprobs.clone()
            logprobs[:, sorted(self.stop_token_ids)] = float("-inf")
        vocab = logprobs.shape[1]
        scores = torch.tensor([beam.cumulative_logprob for beam in beams], dtype=torch.float32)
        totals = (logprobs + scores.to(logprobs.device)[:, None]).reshape(-1)
        num_candidates = min(max(2, 1 + len(self.stop_token_ids)) * self.width, totals.numel())
        top_totals, top_index = totals.topk(num_candidates)
        penalized = (top_totals / (num_generated**self.length_penalty)).tolist()
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        totals_list = top_totals.tolist()
        token_logprobs = logprobs.reshape(-1)[top_index].tolist()
        tops = self._top_logprobs(logprobs)
        at_limit = num_generated >= self.max_new_tokens
        continuations: list[Continuation] = []
        finished: list[Hypothesis] = []
        for rank, (parent, token) in enumerate(zip(parents, tokens)):
            entry = None if tops is None else {**tops[parent], token: token_logprobs[rank]}
            ends = token in self.stop_token_ids
            if ends or at_limit:
                if rank < self.width:
                    beam = beams[parent]
                    reason = FinishReason.STOP if ends else FinishReason.LENGTH
                    history = beam.logprobs + [entry] if entry is not None else []
                    finished.append(
                        Hypothesis(beam.output_token_ids + [token], totals_list[rank], penalized[rank], history, reason)
                    )
            elif len(continuations) < self.width:
                continuations.append(Continuation(parent, token, totals_list[rank], entry))
        self._add_hypotheses(finished)
        if continuations:
            self._update_improvable(continuations[0].cumulative_logprob, num_generated)
        full = len(self.hypotheses) == self.width
        done = not continuations or not self.improvable or (self.early_stopping is True and full)
        return BeamStep(continuations, done)

    def best(self, n: int) -> list[Hypothesis]:
        return self.hypotheses[:n]

    def _top_logprobs(self, logprobs: torch.Tensor) -> list[dict[int, float]] | None:
        if self.num_logprobs is None:
            return None
        if self.num_logprobs == 0:
            return [{} for _ in range(logprobs.shape[0])]
        values, ids = logprobs.topk(self.num_logprobs, dim=-1)
        return [dict(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]

    def _add_hypotheses(self, finished: list[Hypothesis]) -> None:
        """Keep the best `width` hypotheses; none join once the search cannot improve (or is full, early_stopping)."""
        if not finished or not self.improvable:
            return
        if self.early_stopping is True and len(self.hypotheses) == self.width:
            return
        # Stable sort: an older hypothesis wins a tie, as in transformers' merge.
        merged = sorted(self.hypotheses + finished, key=lambda h: h.score, reverse=True)
        self.hypotheses = merged[: self.width]

    def _update_improvable(self, best_live: float, num_generated: int) -> None:
        """Whether the best live beam could still beat the worst kept hypothesis (transformers' heuristic)."""
        if len(self.hypotheses) < self.width:
            return
        if self.early_stopping == "never" and self.length_penalty > 0:
            length = self.max_new_tokens
        else:
            length = num_generated
        best_possible = (torch.tensor(best_live, dtype=torch.float32) / (length**self.length_penalty)).item()
        worst = min(h.score for h in self.hypotheses)
        self.improvable = self.improvable and best_possible > worst


def hypothesis_sequences(request: Request, hypotheses: list[Hypothesis]) -> list[Sequence]:
    """The finished sequences a request reports for its best hypotheses, best first."""
    sequences = []
    for rank, hypothesis in enumerate(hypotheses):
        detokenizer = IncrementalDetokenizer(
            request.sequences[0].detokenizer.tokenizer, request.prompt_token_ids, request.params.skip_special_tokens
        )
        seq = Sequence(request, rank, None, detokenizer, output_token_ids=list(hypothesis.token_ids))
        seq.text = detokenizer.push(hypothesis.token_ids)
        seq.emitted_text_len = len(seq.text)
        seq.logprobs = hypothesis.logprobs
        seq.cumulative_logprob = hypothesis.cumulative_logprob
        seq.finish_reason = hypothesis.finish_reason
        sequences.append(seq)
    return sequences
