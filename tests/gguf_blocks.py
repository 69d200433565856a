"""Test tensors in GGUF's quantized blocks: quantized by gguf where it can, else random bytes with sane scales."""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# Where each type keeps its float16 scales (d, and dmin for Q4_K/Q5_K): the bytes that must stay sane floats.
FLOAT16_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q5_0: (0,), Q.Q8_0: (0,)}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, row bytes] uint8 of a weight [rows, cols] in `qtype`; its values are about 0.02 in size."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0):
        return gguf.quants.quantize(rng.normal(0, 0.02, (rows, cols)).astype(np.float32), qtype)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    # Q6_K's scales are signed 8-bit and its q run to 63, Q4_K/Q5_K's 6-bit scales and minimums to 63 and q to 15/31.
    scale = 0.02 / (63 * 64 if qtype == Q.Q6_K else 63 * 16)
    for offset in FLOAT16_OFFSETS[qtype]:
        halves = rng.uniform(0.5, 2.0, (rows, cols // block_values)) * scale
        blocks[..., offset : offset + 2] = halves.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)
