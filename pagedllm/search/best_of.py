"""best_of > n: draw best_of samples as one engine request and return the n with the highest cumulative logprob."""

from __future__ import annotations

import dataclasses

from pagedllm.engine.output import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.search.driver import SearchDriver, sub_request_id


class BestOfRequest:
    """Samples `best_of` continuations (logprobs on, to rank them) and reports the best n, best first."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = arrival_time
        self.sample_request_id = sub_request_id(request_id, 0)
        self.running = False

    def start(self, driver: SearchDriver) -> None:
        logprobs = 0 if self.params.logprobs is None else self.params.logprobs
        samples = dataclasses.replace(self.params, n=self.params.num_samples, best_of=None, logprobs=logprobs)
        driver.add_request(self, self.sample_request_id, self.prompt_token_ids, samples, keep_kv=False)
        self.running = True

    def on_finished(self, output: RequestOutput, driver: SearchDriver) -> RequestOutput:
        self.running = False
        ranked = sorted(output.outputs, key=lambda o: (-(o.cumulative_logprob or 0.0), o.index))
        wants_logprobs = self.params.logprobs is not None
        outputs = [
            dataclasses.replace(o, index=rank, logprobs=o.logprobs if wants_logprobs else None)
            for rank, o in enumerate(ranked[: self.params.n])
        ]
        return dataclasses.replace(
            output, request_id=self.request_id, prompt=self.prompt, outputs=outputs, arrival_time=self.arrival_time
        )

    def live_request_ids(self) -> list[str]:
        return [self.sample_request_id] if self.running else []
