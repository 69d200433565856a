"""What this machine's CPU can do, as far as the engine's choices depend on it."""

from __future__ import annotations

import functools

# Instruction sets with native bfloat16 matmuls; elsewhere PyTorch emulates them several times slower than float32.
NATIVE_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# Matrix units (AMX tiles), where oneDNN's bfloat16 matmuls run several times faster than on vector units.
BFLOAT16_MATRIX_FLAGS = frozenset({"amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where it is absent)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_bfloat16_matmul() -> bool:
    return bool(NATIVE_BFLOAT16_FLAGS & cpu_flags())


def bfloat16_matrix_units() -> bool:
    return bool(BFLOAT16_MATRIX_FLAGS & cpu_flags())
