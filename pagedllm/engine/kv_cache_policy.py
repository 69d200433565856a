"""The streaming KV-cache policy (StreamingLLM): which tokens a sequence's cache keeps, and when the others leave.

A streaming sequence's cache holds its first `attention_sinks` tokens, then its most recent ones, at cache positions
0, 1, 2, ... without a gap: a token past the sinks sits at cache position `token position - num_evicted_tokens`, and
its query and key are rotated for that cache position, as the paper does, so positions stay below max_model_len
however long the sequence runs and the attention kernels see an ordinary causal context.

Tokens leave a block's worth at a time: before a step, once at least `block_size` tokens lie between the sinks and
the `kv_window - 1` tokens before the step's first query, they all leave; the kept tokens after them move down over
them, their keys re-rotated by the distance moved (layers/kv_compaction.py), and the blocks at the end of the table
go back to the pool. A decoding query therefore sees the sinks and between kv_window and kv_window + block_size - 1
recent tokens (itself included), and a sequence holds at most ceil((attention_sinks + kv_window) / block_size) + 1
blocks; the queries of a prefill chunk also see the chunk's earlier tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.arithmetic import ceil_div
from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.errors import ConfigError, InvalidArgumentError
from pagedllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class StreamingPolicy:
    attention_sinks: int
    kv_window: int
    block_size: int
    max_cache_len: int  # positions the rotary tables hold: max_model_len

    def tokens_to_evict(self, cache_len: int) -> int:
        """Cached tokens (after the sinks) that leave before the next step: none until they fill a block."""
        excess = cache_len - self.attention_sinks - (self.kv_window - 1)
        return excess if excess >= self.block_size else 0

    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks a sequence of `num_tokens` holds at once, computed in chunks of up to `max_chunk`."""
        # Before a step the cache holds at most the sinks, kv_window - 1 tokens and block_size - 1 more.
        most_cached = self.attention_sinks + self.kv_window + self.block_size - 2 + max_chunk
        return ceil_div(min(num_tokens, most_cached, self.max_cache_len), self.block_size)

    def check_request(self, params: SamplingParams, keep_kv: bool) -> None:
        """Refuse what would share a streaming sequence's blocks: they are rewritten in place as tokens leave."""
        if params.n > 1 or params.num_samples > params.n or params.use_beam_search or keep_kv:
            raise InvalidArgumentError(
                "kv_cache_policy streaming takes requests of one sample (n=1, no best_of, no beam search, no keep_kv):"
                " its blocks are rewritten in place, so they cannot be shared",
                "n",
            )


def streaming_policy(config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> StreamingPolicy | None:
    """The engine's streaming policy, None under `full`; raises ConfigError for a model or context it cannot serve."""
    if config.kv_cache_policy != "streaming":
        return None
    if any(window is not None for window in model_config.layer_sliding_windows()):
        raise ConfigError(
            "kv_cache_policy streaming takes models whose layers all see the whole context (no sliding-window layers)",
            "kv_cache_policy",
        )
    needed = config.attention_sinks + config.kv_window + config.block_size
    if needed > max_model_len:
        raise ConfigError(
            f"attention_sinks + kv_window + block_size ({needed}) exceeds max_model_len={max_model_len}: the kept "
            "tokens and one block more must have positions within the context",
            "kv_window",
        )
    return StreamingPolicy(config.attention_sinks, config.kv_window, config.block_size, max_model_len)
