import ctypes

import psutil
import pytest

from pagedllm.engine.host_memory import limit_malloc_arenas, release_freed_memory

try:
    _GLIBC = hasattr(ctypes.CDLL("libc.so.6"), "malloc_trim")
except OSError:
    _GLIBC = False


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc's; elsewhere release_freed_memory does nothing")
def test_release_returns_freed_heap_pages_to_the_os() -> None:
    limit_malloc_arenas(1)
    process = psutil.Process()
    # Small blocks come from the heap, not from mmap: freed, they stay resident until trimmed.
    blocks = [bytearray(64 * 1024) for _ in range(3200)]
    keep = blocks[-1]  # holds the heap's top, so free() alone cannot shrink it
    del blocks
    before = process.memory_info().rss
    release_freed_memory()
    after = process.memory_info().rss
    assert before - after > 100 * 2**20, f"released {(before - after) / 2**20:.0f} MiB of about 200"
    assert len(keep) == 64 * 1024
