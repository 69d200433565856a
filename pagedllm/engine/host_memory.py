"""How host memory is taken from and handed back to the operating system.

glibc's malloc keeps freed heap pages resident, in one heap per thread that allocates: the transient tensors of
model loading, or of one large step, would otherwise stay in the process's resident memory after they are freed.
Elsewhere (another C library, another OS) these are no-ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# After a step, the heap's freed pages go back to the operating system once resident memory has grown this much
# past its level at the last return (see HeapTrimmer).
RESIDENT_GROWTH_LIMIT = 32 * 2**20

# A 2,048-token step's largest activation is 2,048 x 3,072 float32 (25 MiB) for SmolLM2's MLP; the heap serves
# blocks up to STEP_BLOCK_MAX and keeps up to STEP_HEAP_KEEP of freed pages at its top.
STEP_BLOCK_MAX = 64 * 2**20
STEP_HEAP_KEEP = 256 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_malloc_arenas(count: int) -> None:
    """Let at most `count` malloc heaps serve every thread (call before the threads allocate)."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(M_ARENA_MAX, count):
        logger.debug("mallopt(M_ARENA_MAX, %d) was refused", count)


def reuse_freed_step_memory() -> None:
    """Let the heap keep a step's freed activations for the next step instead of unmapping them.

    glibc maps blocks above its threshold (which grows to 32 MiB at most) with mmap and unmaps them when freed, so
    every large step faults its activations in anew, each page zeroed by the kernel: 7 ms for 25 MiB on a 2-core
    Zen 4, half the time of the matmul that writes them. release_freed_memory still returns the kept pages when
    the engine is idle.
    """
    libc = _glibc()
    if libc is None:
        return
    for parameter, value in ((M_MMAP_THRESHOLD, STEP_BLOCK_MAX), (M_TRIM_THRESHOLD, STEP_HEAP_KEEP)):
        if not libc.mallopt(parameter, value):
            logger.debug("mallopt(%d, %d) was refused", parameter, value)


def use_transparent_huge_pages() -> None:
    """Ask PyTorch to back its CPU tensors of 2 MiB and more with transparent huge pages.

    Weights, KV pools and step activations then take a TLB entry per 2 MiB, and `bench serve` measures a lower
    peak resident memory. PyTorch reads the switch once, at the process's first tensor, so this runs when pagedllm
    is imported; a value the user set is kept.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def release_freed_memory() -> None:
    """Return the free pages of every malloc heap to the operating system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _statm(pid: int) -> int | None:
    """A descriptor of process `pid`'s /proc statm file, opened once: HeapTrimmer reads it after every step, and
    opening it costs several times what reading it does. Keyed by pid, so a forked child reads its own."""
    try:
        return os.open(f"/proc/{pid}/statm", os.O_RDONLY)
    except OSError:
        return None


def resident_bytes() -> int | None:
    """The process's resident memory, read from /proc/<pid>/statm; None where there is none."""
    statm = _statm(os.getpid())
    if statm is None:
        return None
    try:
        return int(os.pread(statm, 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int | None:
    """The most resident memory the process has held (VmHWM in /proc/self/status); None where there is none."""
    try:
        with open("/proc/self/status") as status:
            line = next((line for line in status if line.startswith("VmHWM:")), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024


class HeapTrimmer:
    """Returns the heap's freed pages to the operating system after a step that left resident memory
    RESIDENT_GROWTH_LIMIT above its level at the last return.

    Steps of ever different sizes free their activations in holes that the next steps do not quite fit, so a busy
    server's heap would otherwise settle at its fragmented high-water mark (some 150 MiB above its live memory in a
    ShareGPT run at concurrency 16). Between such steps the heap keeps its freed pages for the next step's use.
    """

    def __init__(self, growth_limit: int = RESIDENT_GROWTH_LIMIT) -> None:
        self.growth_limit = growth_limit
        self.floor = resident_bytes()

    def after_step(self) -> None:
        resident = resident_bytes()
        if resident is not None and self.floor is not None and resident > self.floor + self.growth_limit:
            self.release()

    def release(self) -> None:
        """Return every freed page now (as when the engine goes idle)."""
        release_freed_memory()
        self.floor = resident_bytes()
