"""Checkpoint weights read from their file when a model takes them, one at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

import gguf
import torch
from tqdm.auto import tqdm

from pagedllm.layers.gguf_blocks import GGUFWeight
from pagedllm.layers.quantization import Int4Weight, QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


@dataclass(frozen=True)
class StoredLayout:
    """How a checkpoint stores a weight, known without reading its data: its shape ([out, in] for a linear) and
    the input columns its stored form keeps together (a GGUF block's values, an int4 group; 1 for plain values)."""

    shape: tuple[int, ...]
    block_columns: int = 1


def stored_layout(weight: Weight) -> StoredLayout:
    """The layout of a weight already read."""
    if isinstance(weight, GGUFWeight):
        block_columns = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(weight.ggml_type)][0]
    elif isinstance(weight, Int4Weight):
        block_columns = weight.group_size
    else:
        block_columns = 1
    return StoredLayout(tuple(weight.shape), block_columns)


class LazyWeights(MutableMapping[str, Weight]):
    """HF-named weights, each read (and converted) by its reader on every lookup, not held here.

    A model's load_weights takes one weight at a time from a copy() and keeps it in its own layout, so loading holds
    the model's weights and one weight in flight, never every converted weight beside them. Names that share one
    reader (a tied table) give the same object while that reader caches it.
    """

    def __init__(
        self,
        readers: dict[str, Callable[[], Weight]],
        description: str = "",
        layouts: dict[str, StoredLayout] | None = None,
    ) -> None:
        self._readers = readers
        self._layouts = layouts or {}  # by name, what each reader's weight will be; others are read to say
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
        self._layouts[name] = stored_layout(weight)

    def __delitem__(self, name: str) -> None:
        del self._readers[name]
        self._layouts.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def copy(self) -> LazyWeights:
        """The same readers under the same names: taking (pop) from the copy leaves this mapping whole."""
        return LazyWeights(dict(self._readers), self.description, dict(self._layouts))

    def layout(self, name: str) -> StoredLayout:
        """How weight `name` is stored, without reading it where its reader's layout was given."""
        layout = self._layouts.get(name)
        return layout if layout is not None else stored_layout(self[name])

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


def weight_layout(weights: CheckpointWeights, name: str) -> StoredLayout:
    """How weight `name` of a checkpoint is stored: from a LazyWeights without reading it, from a dict as held."""
    return weights.layout(name) if isinstance(weights, LazyWeights) else stored_layout(weights[name])
