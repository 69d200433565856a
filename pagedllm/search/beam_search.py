"""Beam search as transformers' `generate(num_beams=k, do_sample=False)` does it, above the engine core.

`BeamSearch` decides which continuations of the live beams survive a step, which become finished hypotheses,
and when the search is over. `BeamSearchRequest` runs it through ordinary engine requests: each live beam is a
one-token request that keeps its K/V, and each surviving continuation is forked from its parent's request, so
beams share their common blocks and copy a partial one on write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedllm.engine.output import CompletionOutput, RequestOutput
from pagedllm.engine.request import FinishReason
from pagedllm.model.tokenizer import IncrementalDetokenizer, Tokenizer
from pagedllm.sampling_params import SamplingParams
from pagedllm.search.driver import SearchDriver, sub_request_id


@dataclass
class Beam:
    """A live beam's history, and the engine request that scores its next token."""

    request_id: str
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0


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


class BeamSearchRequest:
    """One beam-search request, run as one-token engine requests per live beam and step."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        tokenizer: Tokenizer,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = arrival_time
        self.tokenizer = tokenizer
        self.search = BeamSearch.for_params(params, tokenizer.eos_token_ids)
        self.beams: list[Beam] = []
        self.rows: dict[str, dict[int, float]] = {}  # beam request -> its next token's top logprobs
        self.num_requests = 0
        self.first: RequestOutput | None = None  # the first beam request's output: prompt logprobs, cache hits

    def start(self, driver: SearchDriver) -> None:
        beam = Beam(self._next_request_id())
        params = self._scoring_params()
        params.prompt_logprobs = self.params.prompt_logprobs
        driver.add_request(self, beam.request_id, self.prompt_token_ids, params, keep_kv=True)
        self.beams = [beam]

    def on_finished(self, output: RequestOutput, driver: SearchDriver) -> RequestOutput | None:
        """File a beam's scored next token; once every live beam has one, take a step."""
        self.first = self.first or output
        self.rows[output.request_id] = output.outputs[0].logprobs[0]
        if len(self.rows) < len(self.beams):
            return None
        step = self.search.step(self.beams, self._logprob_rows())
        self.rows = {}
        parents = self.beams
        if step.done:
            self.beams = []
        else:
            self.beams = [self._fork(parents[c.parent], c, driver) for c in step.continuations]
        for parent in parents:
            driver.release_request(parent.request_id)
        return self._output() if step.done else None

    def live_request_ids(self) -> list[str]:
        return [beam.request_id for beam in self.beams]

    def _fork(self, parent: Beam, continuation: Continuation, driver: SearchDriver) -> Beam:
        logprobs = parent.logprobs + [continuation.logprobs] if continuation.logprobs is not None else []
        child = Beam(
            self._next_request_id(),
            parent.output_token_ids + [continuation.token_id],
            logprobs,
            continuation.cumulative_logprob,
        )
        driver.fork_request(self, parent.request_id, child.request_id, [continuation.token_id], self._scoring_params())
        return child

    def _scoring_params(self) -> SamplingParams:
        """One greedy token with enough top logprobs to hold every candidate the step may rank."""
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        num_candidates = max(2, 1 + len(self.search.stop_token_ids)) * self.search.width
        # Masked stop tokens (before min_tokens) leave the candidates' count intact; past the user-facing
        # limit of top logprobs, which the engine itself does not have.
        params.logprobs = max(num_candidates + len(self.search.stop_token_ids), self.params.logprobs or 0)
        return params

    def _logprob_rows(self) -> torch.Tensor:
        """[beams, vocab] log-probabilities: each beam's top entries, -inf elsewhere (never among the ranked)."""
        rows = [self.rows[beam.request_id] for beam in self.beams]
        vocab = 1 + max(max(row) for row in rows)
        dense = torch.full((len(rows), vocab), float("-inf"))
        for index, row in enumerate(rows):
            dense[index, list(row)] = torch.tensor(list(row.values()))
        return dense

    def _next_request_id(self) -> str:
        self.num_requests += 1
        return sub_request_id(self.request_id, self.num_requests)

    def _output(self) -> RequestOutput:
        wants_logprobs = self.params.logprobs is not None
        outputs = []
        for rank, hypothesis in enumerate(self.search.best(self.params.n)):
            detokenizer = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids, self.params.skip_special_tokens)
            outputs.append(
                CompletionOutput(
                    index=rank,
                    text=detokenizer.push(hypothesis.token_ids),
                    token_ids=list(hypothesis.token_ids),
                    cumulative_logprob=hypothesis.cumulative_logprob,
                    logprobs=hypothesis.logprobs if wants_logprobs else None,
                    finish_reason=hypothesis.finish_reason.value,
                )
            )
        assert self.first is not None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.first.prompt_logprobs,
            outputs=outputs,
            finished=True,
            arrival_time=self.arrival_time,
            first_token_time=self.first.first_token_time,
            num_cached_tokens=self.first.num_cached_tokens,
        )
