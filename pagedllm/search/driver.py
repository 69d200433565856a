"""Runs searches (beam search, best_of) above the engine core: their requests are ordinary engine requests, and
their finished outputs come back to them instead of to the caller."""

from __future__ import annotations

from typing import Protocol

from pagedllm.engine.output import RequestOutput
from pagedllm.sampling_params import SamplingParams


class EngineCore(Protocol):
    """The engine calls a search makes (LLMEngine's public API)."""

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        keep_kv: bool = False,
    ) -> None: ...

    def fork_request(
        self, source_id: str, request_id: str, token_ids: list[int], params: SamplingParams, keep_kv: bool = False
    ) -> None: ...

    def release_request(self, request_id: str) -> None: ...

    def abort_request(self, request_id: str) -> None: ...


class Search(Protocol):
    """One user request answered by several engine requests."""

    request_id: str

    def start(self, driver: SearchDriver) -> None: ...

    def on_finished(self, output: RequestOutput, driver: SearchDriver) -> RequestOutput | None:
        """Take one of its engine requests' final output; the search's own output once it is done."""
        ...

    def live_request_ids(self) -> list[str]:
        """Its engine requests that have not finished, or finished and keep their K/V."""
        ...


def sub_request_id(request_id: str, index: int) -> str:
    """The id of a search's index-th engine request (a NUL never comes from the API's own ids)."""
    return f"{request_id}\0{index}"


class SearchDriver:
    """Starts searches, submits their engine requests, and routes those requests' outputs back to them."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.searches: dict[str, Search] = {}  # by the user's request id
        self.search_of: dict[str, Search] = {}  # by engine request id

    def has(self, request_id: str) -> bool:
        return request_id in self.searches or request_id in self.search_of

    def has_unfinished(self) -> bool:
        return bool(self.searches)

    def start(self, search: Search) -> None:
        self.searches[search.request_id] = search
        try:
            search.start(self)
        except Exception:
            self.abort(search.request_id)
            raise

    def add_request(
        self, search: Search, request_id: str, token_ids: list[int], params: SamplingParams, keep_kv: bool
    ) -> None:
        self.engine.add_request(request_id, token_ids, params, keep_kv=keep_kv)
        self.search_of[request_id] = search

    def fork_request(
        self, search: Search, source_id: str, request_id: str, token_ids: list[int], params: SamplingParams
    ) -> None:
        self.engine.fork_request(source_id, request_id, token_ids, params, keep_kv=True)
        self.search_of[request_id] = search

    def release_request(self, request_id: str) -> None:
        self.engine.release_request(request_id)

    def process(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The step's outputs for callers: searches' engine requests are taken out, finished searches put in."""
        passed = []
        for output in outputs:
            search = self.search_of.get(output.request_id)
            if search is None:
                passed.append(output)
            elif output.finished:
                del self.search_of[output.request_id]
                result = search.on_finished(output, self)
                if result is not None:
                    del self.searches[search.request_id]
                    passed.append(result)
        return passed

    def abort(self, request_id: str) -> bool:
        """Abort a search and every engine request it holds; False if `request_id` is no search."""
        search = self.searches.pop(request_id, None)
        if search is None:
            return False
        for engine_request_id in search.live_request_ids():
            self.search_of.pop(engine_request_id, None)
            self.engine.abort_request(engine_request_id)
        return True
