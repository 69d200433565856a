"""A stand-in for LLMEngine with no model: each step gives every request one more token."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import EngineStats
from pagedllm.engine.host_memory import HeapTrimmer
from pagedllm.engine.output import CompletionOutput, RequestOutput
from pagedllm.errors import EngineUnavailableError, InvalidArgumentError
from pagedllm.sampling_params import SamplingParams

BAD_PROMPT = "bad"  # add_request refuses it with InvalidArgumentError
BROKEN_PROMPT = "broken"  # add_request fails with an unexpected exception
GONE_PROMPT = "gone"  # add_request finds the engine gone (a replica died): EngineUnavailableError
STEP_SECONDS = 0.002  # keeps the fake's step loop from spinning a core


@dataclass
class FakeRequest:
    params: SamplingParams
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)


class FakeEngine:
    """Thread-confined like LLMEngine; its events let tests wait for what the engine thread did."""

    model_name = "fake"
    max_model_len = 64
    config = EngineConfig()
    num_blocks = 4  # of config.block_size tokens: the context fits the cache
    tokenizer = None  # token-id prompts only
    grammars = None  # no structured outputs
    weight_bytes = 1000
    file_weight_bytes = 950
    kv_cache_bytes = 2000

    def __init__(self) -> None:
        self.requests: dict[str, FakeRequest] = {}
        self.aborted: list[str] = []
        self.abort_seen = threading.Event()
        self.fail_next_step = False
        self.steps_allowed = threading.Event()
        self.steps_allowed.set()
        self.heap = HeapTrimmer()

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        if prompt == BAD_PROMPT:
            raise InvalidArgumentError("the prompt is bad", "prompt")
        if prompt == BROKEN_PROMPT:
            raise RuntimeError("unexpected")
        if prompt == GONE_PROMPT:
            raise EngineUnavailableError("an engine replica failed: replica 1 is gone")
        self.requests[request_id] = FakeRequest(params, arrival_time or time.monotonic())

    def abort_request(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)
            self.abort_seen.set()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Nothing to stop: the fake runs no worker processes."""

    def step(self) -> list[RequestOutput]:
        self.steps_allowed.wait()
        time.sleep(STEP_SECONDS)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("the step broke")
        outputs = []
        for request_id, request in list(self.requests.items()):
            request.token_ids.append(len(request.token_ids))
            finished = len(request.token_ids) >= request.params.max_tokens
            text = "".join(f"t{token} " for token in request.token_ids)
            sample = CompletionOutput(0, text, list(request.token_ids), None, None, "length" if finished else None)
            outputs.append(
                RequestOutput(request_id, None, [1], None, [sample], finished, request.arrival_time, time.monotonic())
            )
            if finished:
                del self.requests[request_id]
        return outputs

    def stats(self) -> EngineStats:
        zeros = {f.name: 0 for f in fields(EngineStats) if f.name not in ("spec_decode", "replica_prefix_caches")}
        return EngineStats(**{**zeros, "num_running": len(self.requests)})
