"""KL divergence against the float32 reference: zero against itself, positive under quantization, exact on toys."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pagedllm.cli import main
from pagedllm.config import EngineConfig
from pagedllm.evaluation.kl_divergence import (
    compare,
    kl_divergence,
    reference_cache_path,
    reference_config,
    reference_distributions,
    scored_distributions,
)

NUM_TOKENS = 40
WINDOW, STRIDE = 24, 12
TINY_ENGINE = {"kv_cache_memory": 2**22, "max_num_batched_tokens": 16, "enable_prefix_caching": False}


def test_kl_of_toy_distributions_by_hand() -> None:
    p = {0: math.log(0.5), 1: math.log(0.25), 2: math.log(0.25)}
    q = {0: math.log(0.25), 1: math.log(0.5), 2: math.log(0.25)}
    # 0.5·ln(0.5/0.25) + 0.25·ln(0.25/0.5) + 0 = 0.25·ln 2
    assert kl_divergence(p, q) == pytest.approx(0.25 * math.log(2), abs=1e-12)
    assert kl_divergence(p, p) == 0.0


def test_kl_of_partial_lists_groups_the_unknown_mass() -> None:
    # Shared token 0; the rest of the mass is one outcome: P (0.5, rest 0.5), Q (0.4, rest 0.6).
    p = {0: math.log(0.5), 1: math.log(0.3)}
    q = {0: math.log(0.4), 2: math.log(0.1)}
    expected = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert kl_divergence(p, q) == pytest.approx(expected, abs=1e-12)


def test_compare_counts_top1_agreement_and_summarizes() -> None:
    a = {0: math.log(0.7), 1: math.log(0.3)}
    b = {0: math.log(0.3), 1: math.log(0.7)}
    result = compare([a, a, a, b], [a, a, b, b], num_logprobs=2, seconds=1.0)
    assert result.top1_agreement == 0.75 and result.tokens_scored == 4
    single = kl_divergence(a, b)
    assert result.mean_kl_divergence == pytest.approx(single / 4) and result.max_kl_divergence == single
    assert result.covered_mass == pytest.approx(1.0)


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    return torch.randint(0, 49152, (NUM_TOKENS,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> EngineConfig:
    return reference_config(EngineConfig(model=str(tiny_llama_dir), **TINY_ENGINE), None)


def test_setting_against_itself_is_zero_with_full_agreement(reference: EngineConfig, token_ids: list[int]) -> None:
    first, _ = scored_distributions(reference, token_ids, WINDOW, STRIDE, 5)
    again, seconds = scored_distributions(reference, token_ids, WINDOW, STRIDE, 5)
    result = compare(first, again, 5, seconds)
    assert result.tokens_scored == NUM_TOKENS - 1
    assert result.mean_kl_divergence == pytest.approx(0.0, abs=1e-9) and result.max_kl_divergence < 1e-9
    assert result.top1_agreement == 1.0


def test_quantized_setting_diverges(reference: EngineConfig, token_ids: list[int]) -> None:
    ref, _ = scored_distributions(reference, token_ids, WINDOW, STRIDE, 20)
    int4 = EngineConfig(**{**asdict(reference), "quantization": "int4", "quant_group_size": 32})
    test, seconds = scored_distributions(int4, token_ids, WINDOW, STRIDE, 20)
    result = compare(ref, test, 20, seconds)
    # The tiny random model's distributions are nearly flat: its top 20 hold little mass, so the bound is small,
    # but far above the zero of a setting against itself, and the most likely token changes.
    assert result.mean_kl_divergence > 1e-8 and result.max_kl_divergence >= result.p99_kl_divergence > 0
    assert result.top1_agreement < 1 and 0 < result.covered_mass <= 1 + 1e-9


def test_reference_is_stored_once_and_reused(
    reference: EngineConfig, token_ids: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    computed = reference_distributions(reference, token_ids, WINDOW, STRIDE, 3)
    path = reference_cache_path(reference, token_ids, WINDOW, STRIDE, 3)
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert reference_distributions(reference, token_ids, WINDOW, STRIDE, 3) == computed
    assert reference_cache_path(reference, token_ids[:-1], WINDOW, STRIDE, 3) != path


def test_cli_writes_the_run(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    output = tmp_path / "results.json"
    argv = [
        "eval", "kl-divergence", "--model", str(tiny_llama_dir), "--max-tokens", "30", "--window", "16",
        "--stride", "8", "--kv-cache-memory", str(2**22), "--kv-cache-dtype", "int8", "--variant", "KV int8",
        "--output-json", str(output),
    ]  # fmt: skip
    assert main(argv) == 0
    run = json.loads(output.read_text())["runs"][0]
    assert run["kind"] == "kl-divergence" and run["settings"]["variant"] == "KV int8"
    assert run["results"]["tokens_scored"] == 29 and 0 <= run["results"]["top1_agreement"] <= 1
    assert run["results"]["mean_kl_divergence"] > 0
    assert "top-1 agreement" in capsys.readouterr().out
