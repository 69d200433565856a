"""Peak resident memory of a process (and its children), sampled while a benchmark runs."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

import psutil

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.05


def resident_bytes(process: psutil.Process) -> int:
    """RSS of a process plus that of its children (a server may fork workers)."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class PeakMemoryMonitor:
    """Samples a process's RSS in the background of an asyncio run; `peak_bytes` is the largest seen."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        try:
            self.peak_bytes = max(self.peak_bytes, resident_bytes(self.process))
        except psutil.NoSuchProcess:
            logger.warning("process %d is gone; its peak memory stays at %d bytes", self.process.pid, self.peak_bytes)
            raise

    async def __aenter__(self) -> PeakMemoryMonitor:
        self.sample()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        with suppress(psutil.NoSuchProcess):
            self.sample()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except psutil.NoSuchProcess:
                return
