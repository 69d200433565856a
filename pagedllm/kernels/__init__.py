"""CPU kernels of our own, in C++, registered as torch.ops.pagedllm.*: weight-only int4/int8 matmuls and matmuls by
GGUF's own quantized blocks (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q8_0), by Q4_K and Q6_K repacked into tiles of
outputs and by Q8_0 weights in tiles of outputs, decode attention that reads the paged KV cache in place, the
attention of a step's prefills in one call, the KV-cache write, and the small fused ops of a decoder layer (RMSNorm
with the residual add, rotary embedding in place, Gemma's QK-norm with it, SiLU- and GELU-and-multiply), and every
decoder layer of an all-decode step in one call.

They are compiled for this machine's CPU on first use (`make install` does it once) and cached; where no
compiler is available the layers keep their plain PyTorch paths, which the tests check the kernels against.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from pagedllm.cpu import cpu_flags

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = (
    "ops.cpp",
    "quantized_linear.cpp",
    "gguf_linear.cpp",
    "kquant_tiles.cpp",
    "q8_0_tiles.cpp",
    "paged_attention.cpp",
    "prefill_attention.cpp",
    "kv_cache.cpp",
    "rms_norm.cpp",
    "rotary.cpp",
    "activation.cpp",
    "fused_decode.cpp",
    "shared_memory.cpp",
)
HEADERS = ("vec.h", "ops.h", "parallel.h", "row_tiles.h", "norm_row.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp")
CACHE_DIR = Path.home() / ".cache" / "pagedllm" / "kernels"


def build_directory() -> Path:
    """A folder per source folder and version, compiler flags, PyTorch version and CPU (-march=native code runs only
    there); two checkouts would otherwise rebuild over each other, the build files naming their sources' paths."""
    digest = hashlib.sha256(str(SOURCE_DIR).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join((*CFLAGS, torch.__version__, *sorted(cpu_flags()))).encode())
    return CACHE_DIR / digest.hexdigest()[:16]


@functools.cache
def cpu_kernels_available() -> bool:
    """Build (once, cached on disk) and load the kernels; False, with a warning, where that fails."""
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        load(
            name="pagedllm_cpu_kernels",
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch paths still work
        logger.warning("pagedllm CPU kernels unavailable, using the PyTorch paths: %s", error)
        return False
    return True


def _put_ninja_on_path() -> None:
    """PyTorch's extension builder runs `ninja` from PATH; the ninja package's binary is there only in an
    activated virtualenv."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def use_cpu_kernels(tensor: torch.Tensor) -> bool:
    """Whether the kernels serve computations on `tensor`'s device."""
    return tensor.device.type == "cpu" and cpu_kernels_available()
