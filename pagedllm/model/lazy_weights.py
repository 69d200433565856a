"""Checkpoint weights read from their file when a model takes them, one at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping

import torch
from tqdm.auto import tqdm

from pagedllm.layers.quantization import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


class LazyWeights(MutableMapping[str, Weight]):
    """HF-named weights, each read (and converted) by its reader on every lookup, not held here.

    A model's load_weights takes one weight at a time from a copy() and keeps it in its own layout, so loading holds
    the model's weights and one weight in flight, never every converted weight beside them. Names that share one
    reader (a tied table) give the same object while that reader caches it.
    """

    def __init__(self, readers: dict[str, Callable[[], Weight]], description: str = "") -> None:
        self._readers = readers
        self.description = description
        self._progress: tqdm | None = None
        self._read: set[int] = set()  # the readers that have read once, by id

    def __getitem__(self, name: str) -> Weight:
        reader = self._readers[name]
        weight = reader()
        self._advance(reader)
        return weight

    def __setitem__(self, name: str, weight: Weight) -> None:
        self._readers[name] = lambda: weight

    def __delitem__(self, name: str) -> None:
        del self._readers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def copy(self) -> LazyWeights:
        """The same readers under the same names: taking (pop) from the copy leaves this mapping whole."""
        return LazyWeights(dict(self._readers), self.description)

    def _advance(self, reader: Callable[[], Weight]) -> None:
        """A progress bar over the readers' first reads, shown while a model takes its weights."""
        if id(reader) in self._read:
            return
        if self._progress is None:
            total = len({id(reader) for reader in self._readers.values()})
            self._progress = tqdm(total=total, desc=self.description, unit="tensor", leave=False)
        self._read.add(id(reader))
        self._progress.update()
        if self._progress.n >= (self._progress.total or 0):
            self._progress.close()


CheckpointWeights = dict[str, Weight] | LazyWeights
