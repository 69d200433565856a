"""Hidden states a step hands back besides logits, for the requests that ask for them (contrastive search, DoLa).

Early layers' states are taken by forward hooks on the decoder layers, registered for one forward only: a step
that captures none runs the model untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HiddenCapture:
    """Which rows' hidden states a step keeps, and after the forward, the kept states."""

    final_rows: list[int] = field(default_factory=list)  # rows whose final-normed last-layer states are kept
    layer_rows: list[int] = field(default_factory=list)  # rows whose early layers' states are kept
    layers: list[int] = field(default_factory=list)  # as transformers' hidden_states: 0 embeddings, i layer i - 1
    final: torch.Tensor | None = None  # [len(final_rows), hidden]
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [len(layer_rows), hidden]

    @property
    def wants_anything(self) -> bool:
        return bool(self.final_rows or self.layers)


@contextmanager
def capturing_layers(layers: nn.ModuleList, capture: HiddenCapture, device: torch.device) -> Iterator[None]:
    """Record the residual stream after each of `capture.layers` at `capture.layer_rows` during the forward inside.

    A layer returns (its output, the residual before it is added), and the next layer adds them in place: the sum is
    taken in the hook, before that happens.
    """
    if not capture.layers:
        yield
        return
    rows = torch.tensor(capture.layer_rows, device=device)
    handles = []
    for index in capture.layers:
        if index == 0:
            handles.append(layers[0].register_forward_pre_hook(_embedding_hook(capture, rows)))
        else:
            handles.append(layers[index - 1].register_forward_hook(_layer_hook(capture, index, rows)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _embedding_hook(capture: HiddenCapture, rows: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> None:
        capture.by_layer[0] = args[1][rows]  # (positions, hidden, residual, meta): the scaled embeddings

    return hook


def _layer_hook(capture: HiddenCapture, index: int, rows: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        hidden, residual = output
        capture.by_layer[index] = hidden[rows] + residual[rows]

    return hook
