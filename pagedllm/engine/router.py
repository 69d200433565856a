"""Data-parallel routing by prefix-cache affinity and load, as SGLang's cache-aware router does it.

The driver has no view of the replicas' prefix caches: it keeps its own approximate record of the prompt blocks it
has sent to each replica, bounded and least recently routed first out, as the replica's cache is. A request goes to
the replica whose record holds the longest prefix of its prompt, when that prefix has at least
`prefix_affinity_min_tokens` tokens, among the replicas with at most `prefix_affinity_max_load_gap` more requests in
flight than the least-loaded one; otherwise to the least-loaded replica.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pagedllm.arithmetic import ceil_div

logger = logging.getLogger(__name__)

ROOT_HASH = 0


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The identity of each full block of `token_ids`: a hash of its tokens chained with the hash of the block
    before, so that equal hashes stand (but for collisions) for equal prefixes."""
    hashes = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixRecord:
    """The block hashes routed to one replica, at most `capacity` of them, the least recently routed evicted first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prefix record holds at least one block, got capacity {capacity}")
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (its `hashes`) this record holds."""
        for index, block in enumerate(hashes):
            if block not in self.blocks:
                return index
        return len(hashes)

    def insert(self, hashes: Sequence[int]) -> None:
        """Record a prompt's blocks as the most recently routed, evicting the least recent past the capacity."""
        # Last block first, so a prefix is always more recent than the blocks after it and outlives them: eviction
        # never leaves a block whose prefix is gone (which `match` could not reach).
        for block in reversed(hashes):
            self.blocks[block] = None
            self.blocks.move_to_end(block)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


@dataclass(frozen=True)
class RoutingPolicy:
    """When prefix-cache affinity wins over load (the settings of the same names)."""

    prefix_affinity_min_tokens: int
    prefix_affinity_max_load_gap: int


class PrefixAffinityRouter:
    """Chooses a replica for each prompt from the prefixes recorded per replica and the replicas' loads."""

    def __init__(self, num_replicas: int, block_size: int, record_blocks: int, policy: RoutingPolicy | None) -> None:
        """`record_blocks`: the blocks recorded per replica; `policy` None routes by load alone."""
        self.block_size = block_size
        self.policy = policy
        self.records = [PrefixRecord(record_blocks) for _ in range(num_replicas)]
        self.removed: set[int] = set()  # replicas that died: never chosen again

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(token_ids, self.block_size)

    def remove(self, index: int) -> None:
        """Replica `index` is gone: no prompt goes to it any more (one replica at least stays)."""
        self.removed.add(index)
        self.records[index] = PrefixRecord(1)

    def choose(self, hashes: Sequence[int], loads: Sequence[int]) -> int:
        """The replica for a prompt of block `hashes`, given each replica's requests in flight."""
        live = [index for index in range(len(loads)) if index not in self.removed]
        least_loaded = min(live, key=loads.__getitem__)
        if self.policy is None or not hashes:
            return least_loaded
        min_blocks = max(1, ceil_div(self.policy.prefix_affinity_min_tokens, self.block_size))
        max_load = loads[least_loaded] + self.policy.prefix_affinity_max_load_gap
        candidates = [index for index in live if loads[index] <= max_load]
        matches = {index: self.records[index].match(hashes) for index in candidates}
        # The longest match; among equal ones the least loaded, then the first.
        best = max(candidates, key=lambda index: (matches[index], -loads[index], -index))
        if matches[best] < min_blocks:
            return least_loaded
        logger.debug("routed by a cached prefix of %d tokens to replica %d", matches[best] * self.block_size, best)
        return best

    def record(self, index: int, hashes: Sequence[int]) -> None:
        """Note that replica `index` was sent a prompt of block `hashes` (its prefix cache will hold them)."""
        self.records[index].insert(hashes)
