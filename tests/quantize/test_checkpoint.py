"""The AWQ checkpoint: exact write → load, and a fresh process serving it greedily as the in-memory model does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedllm.layers.quantization import Int4Weight, dequantize
from pagedllm.model.loader import load_checkpoint
from pagedllm.quantize.awq import AWQSettings, awq_quantize
from pagedllm.quantize.checkpoint import is_awq_checkpoint, pack_nibbles, unpack_nibbles, write_awq_checkpoint
from pagedllm.quantize.command import quantize_model
from pagedllm.quantize.dense_model import forward_logits

GROUP_SIZE = 32
PROMPT = [1, 520, 3002, 42, 17, 8000, 91]
NEW_TOKENS = 8
GENERATE_SCRIPT = """
import json, sys
from pagedllm import LLM, SamplingParams
llm = LLM(sys.argv[1], kv_cache_memory=2**22)
params = SamplingParams(max_tokens=int(sys.argv[3]), temperature=0.0, ignore_eos=True)
print(json.dumps(llm.generate(json.loads(sys.argv[2]), params)[0].outputs[0].token_ids))
"""


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_nibbles_round_trip(rows: int, half_columns: int, seed: int) -> None:
    q = torch.randint(0, 16, (rows, 2 * half_columns), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_nibbles(q)
    assert packed.shape == (rows, half_columns) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), q)


def test_write_then_load_is_exact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Group 128 does not divide the tiny model's 64 or 160 input channels: it takes groups of 64 and 32."""
    checkpoint = load_checkpoint(tiny_llama_dir, torch.float32)
    calibration = torch.randint(0, checkpoint.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    quantized, _ = awq_quantize(checkpoint.config, checkpoint.weights, calibration, AWQSettings(128, grid_points=3))
    write_awq_checkpoint(tmp_path, checkpoint.config, quantized, 128)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert is_awq_checkpoint(raw) and raw["quantization_config"]["group_size"] == 128
    loaded = load_checkpoint(tmp_path, torch.float32)
    assert loaded.config == checkpoint.config
    assert set(loaded.weights) == set(quantized)
    for name, value in quantized.items():
        other = loaded.weights[name]
        if isinstance(value, Int4Weight):
            assert isinstance(other, Int4Weight) and other.group_size == (32 if "down_proj" in name else 64)
            assert torch.equal(other.q, value.q) and torch.equal(other.scales, value.scales)
            assert torch.equal(other.mins, value.mins)
        else:
            assert torch.equal(other, value), name


def dense_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint's dequantized weights with the plain full-context forward."""
    checkpoint = load_checkpoint(folder, torch.float32)
    weights = {n: dequantize(v) if isinstance(v, Int4Weight) else v for n, v in checkpoint.weights.items()}
    return forward_logits(checkpoint.config, weights, ids)


def dense_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of the checkpoint's dequantized weights with the plain full-context forward."""
    checkpoint = load_checkpoint(folder, torch.float32)
    weights = {n: dequantize(v) if isinstance(v, Int4Weight) else v for n, v in checkpoint.weights.items()}
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(forward_logits(checkpoint.config, weights, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_quantized_folder_serves_the_in_memory_model_in_a_fresh_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "awq"
    report = quantize_model(
        str(tiny_llama_dir), out, AWQSettings(GROUP_SIZE, grid_points=5), calib_samples=2, calib_seq_len=16
    )
    assert report.alphas and (out / "tokenizer_config.json").is_file()
    expected = dense_greedy(out, PROMPT, NEW_TOKENS)
    float_tokens = dense_greedy(tiny_llama_dir, PROMPT, NEW_TOKENS)
    completed = subprocess.run(
        [sys.executable, "-c", GENERATE_SCRIPT, str(out), json.dumps(PROMPT), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == expected
    # The folder really holds the int4 model: its logits are not the float model's (AWQ is close enough to the
    # float model that the greedy tokens may agree).
    ids = torch.tensor([PROMPT + float_tokens])
    assert not torch.allclose(dense_logits(out, ids), dense_logits(tiny_llama_dir, ids), atol=1e-3)
