"""Peak resident memory of a process (and its children), sampled while a benchmark runs or read when it ends."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import subprocess
import tempfile
import threading
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


def run_with_peak_rss(command: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run a command to completion with its output captured, and its peak RSS in bytes as the kernel counted it."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            # wait4 reaps the child with its own resource usage (ru_maxrss: KiB on Linux).
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
    return subprocess.CompletedProcess(command, process.returncode, *output), usage.ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
