"""Layer tests run on tiny tensors."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead, and spin badly when the CPU is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
