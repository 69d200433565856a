"""Time one GGUF-block linear at a 1B Llama's shapes: the kernel against a matmul by the dequantized weight."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import gguf
import torch
import torch.nn.functional as F

from pagedllm.kernels import cpu_kernels_available
from pagedllm.layers.gguf_blocks import GGUF_NATIVE_TYPES, GGUFWeight, dequantize_blocks
from tests.gguf_blocks import random_blocks

SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192))  # (out, in): attention, gate/up, down


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, in milliseconds (the machine may be shared)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--types", nargs="+", default=[q.name for q in GGUF_NATIVE_TYPES])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = parser.parse_args()
    assert cpu_kernels_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}")
    print("type  out x in      rows  kernel ms  bf16 ms  f32 ms")
    for name in args.types:
        qtype = gguf.GGMLQuantizationType[name]
        for out_features, in_features in SHAPES:
            weight = GGUFWeight(torch.from_numpy(random_blocks(qtype, out_features, in_features)), int(qtype))
            dense32 = dequantize_blocks(weight)
            dense16 = dense32.bfloat16()
            for rows in args.rows:
                x = torch.randn(rows, in_features)
                x16 = x.bfloat16()
                kernel = best_ms(partial(torch.ops.pagedllm.gguf_linear, x16, weight.blocks, int(qtype)), args.repeats)
                bf16 = best_ms(partial(F.linear, x16, dense16), args.repeats)
                f32 = best_ms(partial(F.linear, x, dense32), args.repeats)
                print(f"{name:5} {out_features:5}x{in_features:<5} {rows:5} {kernel:10.3f} {bf16:8.3f} {f32:7.3f}")


if __name__ == "__main__":
    main()
