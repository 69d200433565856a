"""KV-cache policies that evict: which tokens a sequence's cache keeps, and when the others leave.

`streaming` (StreamingLLM) keeps a sequence's first `attention_sinks` tokens and its most recent ones; `h2o`
(Heavy-Hitter Oracle) keeps, within `kv_budget` tokens, its most recent ones and the heavy hitters: the earlier tokens
that received the most attention so far, summed over every whole-context layer, head and query since they entered
the cache.

An evicting sequence's cache holds its kept tokens in their order at cache positions 0, 1, 2, ... without a gap: the
newest tokens sit at `token position - num_evicted_tokens`, and every kept token's query and key are rotated for its
cache position, as StreamingLLM does, so positions stay below max_model_len however long the sequence runs and the
attention kernels see an ordinary causal context. (H2O's paper keeps original positions, but it never runs past the
model's context; here both policies must, so both count positions within the cache.)

Tokens leave a block's worth at a time: before a step, once the cache holds at least `block_size` tokens more than
the kept ones less one (the step's first query makes up the rest), the others all leave; the kept tokens move down
over them, their keys re-rotated by the distance each moved (layers/kv_compaction.py), and the blocks at the end of
the table go back to the pool. A decoding query therefore sees between `num_kept` and `num_kept + block_size - 1`
tokens (itself included), and a sequence holds at most ceil(num_kept / block_size) + 1 blocks while it decodes; the
queries of a prefill chunk also see the chunk's earlier tokens.

The policy applies to the layers that see the whole context. A model's sliding-window layers (Gemma 3's local ones)
keep exactly their window of the most recent tokens, by their own mechanism, whether or not those tokens are still
in the whole-context layers' cache: a query rotates for its cache position in every layer, and their keys are
re-rotated as tokens leave so that each stays at its distance from the query (layers/kv_compaction.py). The local
layers then attend exactly as without a policy, and the bounds above hold for each whole-context KV-cache group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pagedllm.arithmetic import ceil_div
from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.errors import ConfigError, InvalidArgumentError
from pagedllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class EvictionPolicy(ABC):
    """What the streaming and h2o policies share: the block bounds and the requests they take."""

    name: str
    num_kept: int  # the most tokens a decoding query sees, itself included, before a block's worth leaves
    block_size: int
    max_cache_len: int  # positions the rotary tables hold: max_model_len

    @property
    def reports_attention(self) -> bool:
        """Whether eviction needs the attention each cached token receives (Sequence.kv_scores)."""
        return False

    def num_to_evict(self, cache_len: int) -> int:
        """Cached tokens that leave before the next step: none until they fill a block."""
        excess = cache_len - (self.num_kept - 1)
        return excess if excess >= self.block_size else 0

    @abstractmethod
    def kept_positions(self, cache_len: int, scores: torch.Tensor | None) -> list[int] | None:
        """The cache positions that stay before the next step, in order; None when no token leaves."""

    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks a sequence of `num_tokens` holds at once, computed in chunks of up to `max_chunk`."""
        # Before a step the cache holds at most num_kept - 1 tokens and block_size - 1 more.
        most_cached = self.num_kept + self.block_size - 2 + max_chunk
        return ceil_div(min(num_tokens, most_cached, self.max_cache_len), self.block_size)

    def check_request(self, params: SamplingParams, keep_kv: bool) -> None:
        """Refuse forks, which share partly filled blocks: an evicting sequence's blocks are rewritten in place, and
        only whole prefix-cache blocks are copied first (BlockManager.evict)."""
        if params.n > 1 or params.num_samples > params.n or params.use_beam_search or keep_kv:
            raise InvalidArgumentError(
                f"kv_cache_policy {self.name} takes requests of one sample (n=1, no best_of, no beam search, no "
                "keep_kv): its blocks are rewritten in place, so they cannot be shared",
                "n",
            )


@dataclass(frozen=True)
class StreamingPolicy(EvictionPolicy):
    """StreamingLLM: the first `attention_sinks` tokens and the `num_kept - attention_sinks` most recent ones."""

    attention_sinks: int = 4

    def kept_positions(self, cache_len: int, scores: torch.Tensor | None) -> list[int] | None:
        shift = self.num_to_evict(cache_len)
        if not shift:
            return None
        return [*range(self.attention_sinks), *range(self.attention_sinks + shift, cache_len)]


@dataclass(frozen=True)
class H2OPolicy(EvictionPolicy):
    """Heavy-Hitter Oracle: half the budget (rounded up) for the most recent tokens, the rest for the earlier tokens
    with the largest accumulated attention, the paper's even split."""

    @property
    def reports_attention(self) -> bool:
        return True

    @property
    def num_recent(self) -> int:
        """The most recent tokens a decoding query sees, itself included, at the least."""
        return self.num_kept - self.num_heavy

    @property
    def num_heavy(self) -> int:
        return self.num_kept // 2

    def kept_positions(self, cache_len: int, scores: torch.Tensor | None) -> list[int] | None:
        """`scores[i]`: the attention cache position i received; ties go to the earlier position."""
        if not self.num_to_evict(cache_len):
            return None
        if scores is None or scores.shape[0] != cache_len:
            raise RuntimeError(f"h2o needs the accumulated attention of all {cache_len} cached tokens")
        first_recent = cache_len - (self.num_recent - 1)
        # A stable descending sort keeps the earlier of equal scores: the choice is reproducible.
        order = torch.sort(scores[:first_recent], descending=True, stable=True).indices[: self.num_heavy]
        return [*sorted(order.tolist()), *range(first_recent, cache_len)]


def eviction_policy(config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> EvictionPolicy | None:
    """The engine's evicting policy, None under `full`; raises ConfigError for a model or context it cannot serve."""
    name = config.kv_cache_policy
    if name == "full":
        return None
    if all(window is not None for window in model_config.layer_sliding_windows()):
        raise ConfigError(
            f"kv_cache_policy {name} evicts from the layers that see the whole context, and every layer of this "
            "model has a sliding window",
            "kv_cache_policy",
        )
    if name == "streaming":
        num_kept, what, param = config.attention_sinks + config.kv_window, "attention_sinks + kv_window", "kv_window"
    else:
        num_kept, what, param = config.kv_budget, "kv_budget", "kv_budget"
    if num_kept + config.block_size > max_model_len:
        raise ConfigError(
            f"{what} + block_size ({num_kept + config.block_size}) exceeds max_model_len={max_model_len}: the kept "
            "tokens and one block more must have positions within the context",
            param,
        )
    if name == "streaming":
        return StreamingPolicy(name, num_kept, config.block_size, max_model_len, config.attention_sinks)
    return H2OPolicy(name, num_kept, config.block_size, max_model_len)
