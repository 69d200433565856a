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

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


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
