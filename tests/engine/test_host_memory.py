import ctypes
import mmap
import os
import subprocess
import sys

import psutil
import pytest

from pagedllm.engine.host_memory import (
    HeapTrimmer,
    limit_malloc_arenas,
    peak_resident_bytes,
    release_freed_memory,
    resident_bytes,
)

try:
    _GLIBC = hasattr(ctypes.CDLL("libc.so.6"), "malloc_trim")
except OSError:
    _GLIBC = False


def freed_heap_blocks(total: int) -> bytearray:
    """Leave `total` bytes of freed blocks resident in the heap, below a block that is kept (returned).

    Small blocks come from the heap, not from mmap: freed, they stay resident until trimmed; the kept one holds the
    heap's top, so free() alone cannot shrink it.
    """
    blocks = [bytearray(64 * 1024) for _ in range(total // (64 * 1024))]
    return blocks[-1]


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc's; elsewhere release_freed_memory does nothing")
def test_release_returns_freed_heap_pages_to_the_os() -> None:
    limit_malloc_arenas(1)
    process = psutil.Process()
    keep = freed_heap_blocks(200 * 2**20)
    before = process.memory_info().rss
    release_freed_memory()
    after = process.memory_info().rss
    assert before - after > 100 * 2**20, f"released {(before - after) / 2**20:.0f} MiB of about 200"
    assert len(keep) == 64 * 1024


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc's; elsewhere release_freed_memory does nothing")
@pytest.mark.parametrize(("growth_limit", "returned"), [(64 * 2**20, True), (1024 * 2**20, False)])
def test_heap_trimmer_returns_freed_pages_once_resident_memory_grew_past_its_limit(
    growth_limit: int, returned: bool
) -> None:
    limit_malloc_arenas(1)
    trimmer = HeapTrimmer(growth_limit)
    keep = freed_heap_blocks(200 * 2**20)
    before = resident_bytes()
    trimmer.after_step()
    after = resident_bytes()
    assert before is not None and after is not None and len(keep) == 64 * 1024
    if returned:
        assert before - after > 100 * 2**20, f"returned {(before - after) / 2**20:.0f} MiB of about 200"
        assert trimmer.floor is not None and trimmer.floor <= after + 2**20
    else:
        assert before - after < 16 * 2**20, f"returned {(before - after) / 2**20:.0f} MiB within the limit"
    trimmer.release()


@pytest.mark.skipif(resident_bytes() is None, reason="no /proc: neither is known")
def test_peak_resident_memory_keeps_the_high_water_mark_after_a_block_is_freed() -> None:
    block = b"\x01" * (64 * 2**20)  # written, so resident
    held = resident_bytes()
    del block
    release_freed_memory()
    after = resident_bytes()
    peak = peak_resident_bytes()
    assert held is not None and after is not None and peak is not None
    assert peak >= held > after + 32 * 2**20


_OFFSET_OF_AN_8_MIB_TENSOR = f"""
import pagedllm
import torch
print(torch.empty(2 * 2**20).data_ptr() % {mmap.PAGESIZE})
"""


@pytest.mark.parametrize(("user_value", "page_aligned"), [(None, True), ("0", False)])
def test_importing_pagedllm_gives_large_tensors_huge_pages_unless_the_user_said_no(
    user_value: str | None, page_aligned: bool
) -> None:
    # With the switch on, PyTorch aligns its CPU allocations to whole pages (so that it can advise huge pages on
    # them); off, to 64 bytes, which glibc's large blocks never meet at a page boundary.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    run = subprocess.run([sys.executable, "-c", _OFFSET_OF_AN_8_MIB_TENSOR], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (int(run.stdout) == 0) == page_aligned, f"offset from a page boundary: {run.stdout.strip()}"


_FAULTS_OF_FIVE_32_MIB_BLOCKS = """
import ctypes, resource, sys
from pagedllm.engine.host_memory import reuse_freed_step_memory
if sys.argv[1] == "reuse":
    reuse_freed_step_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = libc.malloc(32 * 2**20)
    ctypes.memset(block, 1, 32 * 2**20)
    libc.free(ctypes.c_void_p(block))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's; elsewhere reuse_freed_step_memory does nothing")
def test_a_freed_step_block_is_reused_without_faulting_its_pages_in_again() -> None:
    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_FIVE_32_MIB_BLOCKS, mode], capture_output=True, text=True, check=True
        )
        return int(run.stdout)

    pages = 32 * 2**20 // mmap.PAGESIZE
    # Unmapped when freed, each block faults all its pages in again; kept, only the first one does.
    assert faults("unmap") > 4 * pages
    assert faults("reuse") < 2 * pages


@pytest.mark.skipif(resident_bytes() is None or not hasattr(os, "fork"), reason="no /proc or no fork")
def test_a_forked_child_reads_its_own_resident_memory_not_its_parents() -> None:
    parent = resident_bytes()  # the parent's statm is open from here on
    block = b"\x01" * (256 * 2**20)  # the parent holds 256 MiB that the child frees at once
    pid = os.fork()
    if pid == 0:  # the child: the block's pages are shared with the parent until written or freed
        del block
        release_freed_memory()
        child = resident_bytes()
        os._exit(0 if child is not None and parent is not None and child < parent + 128 * 2**20 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    held = resident_bytes()
    assert held is not None and parent is not None and held > parent + 200 * 2**20 and len(block) == 256 * 2**20
