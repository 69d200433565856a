"""The most resident memory a call adds to this process, from Linux's high-water mark (VmHWM)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def peak_resident_growth(call: Callable[[], T]) -> tuple[T, int]:
    """`call()`'s result and how many bytes its peak resident memory rose above the resident memory before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident memory
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    before = _status_kib("VmRSS")
    result = call()
    return result, (_status_kib("VmHWM") - before) * 1024
