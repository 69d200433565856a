"""Searches over continuations (beam search, best_of), run above the engine core through ordinary requests."""

from pagedllm.search.beam_search import BeamSearchRequest
from pagedllm.search.best_of import BestOfRequest
from pagedllm.search.driver import SearchDriver

__all__ = ["BeamSearchRequest", "BestOfRequest", "SearchDriver"]
