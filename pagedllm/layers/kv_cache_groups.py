"""KV-cache groups: layers with the same attention span share block tables, as vLLM's hybrid allocator groups them.

Every group holds the same number of layers, so a block is the same number of bytes in every group: the pools are
`layers_per_group` K and V tensors, and layer j of each group uses pool j. A block id belongs to one group at a time,
so one allocator serves them all and a block freed by a sliding-window group is at once free for any group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagedllm.config import ModelConfig


@dataclass(frozen=True)
class KVCacheGroup:
    layers: tuple[int, ...]
    sliding_window: int | None  # None: the layers see the whole context


@dataclass(frozen=True)
class KVCacheLayout:
    groups: tuple[KVCacheGroup, ...]

    @property
    def layers_per_group(self) -> int:
        return len(self.groups[0].layers)

    @property
    def sliding_windows(self) -> list[int | None]:
        return [group.sliding_window for group in self.groups]

    def group_of(self, layer: int) -> int:
        return next(g for g, group in enumerate(self.groups) if layer in group.layers)

    def pool_of(self, layer: int) -> int:
        """Which of the `layers_per_group` pools the layer's K/V live in."""
        return self.groups[self.group_of(layer)].layers.index(layer)


def kv_cache_layout(config: ModelConfig) -> KVCacheLayout:
    """Groups of equal size (the gcd of the layer counts of each span), whole-context layers first."""
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(config.layer_sliding_windows()):
        by_window.setdefault(window, []).append(layer)
    size = math.gcd(*(len(layers) for layers in by_window.values()))
    spans = sorted(by_window, key=lambda window: (window is not None, window or 0))
    groups = [
        KVCacheGroup(tuple(by_window[window][start : start + size]), window)
        for window in spans
        for start in range(0, len(by_window[window]), size)
    ]
    return KVCacheLayout(tuple(groups))


def first_visible_block(position: int, sliding_window: int, block_size: int) -> int:
    """The first block a query at `position` sees through a sliding window; the ones before it can go back."""
    return max(0, position - sliding_window + 1) // block_size
