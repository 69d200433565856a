"""What this machine's CPU can do, as far as the engine's choices depend on it."""

from __future__ import annotations

import functools

# Instruction sets with native bfloat16 matmuls; elsewhere PyTorch emulates them several times slower than float32.
NATIVE_BFLOAT16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# Matrix units (AMX tiles), where oneDNN's bfloat16 matmuls run several times faster than on vector units.
BFLOAT16_MATRIX_FLAGS = frozenset({"amx_bf16"})


# AMD's CPU families by the core design they name; family 25 spans Zen 3 and Zen 4, which AVX-512 tells apart.
AMD_CORES = {23: "Zen 2", 26: "Zen 5"}


@functools.cache
def cpuinfo_field(name: str) -> str:
    """The first value /proc/cpuinfo gives for `name` (empty where it is absent)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.partition(":")[0].strip() == name), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where it is absent)."""
    return frozenset(cpuinfo_field("flags").split())


def core_design() -> str:
    """The CPU's core design where its model name does not say it (AMD EPYC is Zen 2 to Zen 5), else its widest
    vector unit the kernels use: what tells two machines of one model name apart in benchmark results."""
    family = cpuinfo_field("cpu family")
    if cpuinfo_field("vendor_id") == "AuthenticAMD" and family.isdigit():
        if int(family) == 25:
            return "Zen 4" if "avx512f" in cpu_flags() else "Zen 3"
        if int(family) in AMD_CORES:
            return AMD_CORES[int(family)]
    flags = cpu_flags()
    return "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""


def native_bfloat16_matmul() -> bool:
    return bool(NATIVE_BFLOAT16_FLAGS & cpu_flags())


def bfloat16_matrix_units() -> bool:
    return bool(BFLOAT16_MATRIX_FLAGS & cpu_flags())
