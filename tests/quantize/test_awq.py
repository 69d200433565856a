"""AWQ: scale folding keeps the float model's function; the scale search never loses to plain min-max int4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.layers.quantization import Int4Weight, dequantize, quantize_int4
from pagedllm.model.loader import load_checkpoint
from pagedllm.quantize.awq import (
    AWQSettings,
    awq_quantize,
    clip_weight,
    fold_scales,
    scale_groups,
    search_scales,
)
from pagedllm.quantize.dense_model import forward_logits
from tests.checkpoints import write_checkpoint

GROUP_SIZE = 32  # divides the tiny models' 64 hidden and 160 intermediate channels


@pytest.fixture(scope="module")
def tiny_mha_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Heads not shared, so o_proj's scales fold into v_proj too."""
    folder = tmp_path_factory.mktemp("tiny-mha")
    write_checkpoint("llama-mha-llama3-rope", folder, tokenizer_dir)
    return folder


@pytest.mark.parametrize("folder_fixture", ["tiny_llama_dir", "tiny_mha_dir"])
def test_folding_scales_keeps_float_logits(folder_fixture: str, request: pytest.FixtureRequest) -> None:
    checkpoint = load_checkpoint(request.getfixturevalue(folder_fixture), torch.float32)
    config, weights = checkpoint.config, dict(checkpoint.weights)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    before = forward_logits(config, weights, ids)
    generator = torch.Generator().manual_seed(1)
    folded = 0
    for index in range(config.num_layers):
        for group in scale_groups(config, index):
            in_features = weights[group.linears[0] + ".weight"].shape[1]
            fold_scales(weights, group, torch.exp(torch.randn(in_features, generator=generator)))
            folded += 1
    assert folded == config.num_layers * (4 if config.num_heads == config.num_kv_heads else 3)
    changed = weights["model.layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(changed, checkpoint.weights["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(forward_logits(config, weights, ids), before, rtol=1e-4, atol=1e-4)


def minmax_error(x: torch.Tensor, weight: torch.Tensor) -> float:
    """The calibration objective for plain min-max int4, computed without the search."""
    return (x @ weight.T - x @ dequantize(quantize_int4(weight, GROUP_SIZE)).T).pow(2).mean().item()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 50.0), st.integers(1, 3))
def test_search_is_never_worse_than_minmax(seed: int, outlier_size: float, in_groups: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    in_features = GROUP_SIZE * in_groups
    x = torch.randn(64, in_features, generator=generator)
    x[:, : in_features // 8] *= 1 + outlier_size
    weight = torch.randn(24, in_features, generator=generator)
    found = search_scales(x, x.abs().mean(0), weight, GROUP_SIZE, grid_points=11)
    assert found.minmax_error == pytest.approx(minmax_error(x, weight), rel=1e-5)
    assert found.error <= found.minmax_error
    assert 0.0 <= found.alpha <= 1.0 and found.scales.shape == (in_features,)


def test_search_gains_on_outlier_channels() -> None:
    """With a few channels carrying most of the activation, scaling them up protects them from rounding."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    x[:, :4] *= 30
    weight = torch.randn(32, 64, generator=generator)
    found = search_scales(x, x.abs().mean(0), weight, GROUP_SIZE, grid_points=21)
    assert found.alpha > 0
    assert found.error < 0.8 * found.minmax_error


def test_awq_quantizes_every_decoder_linear(tiny_llama_dir: Path) -> None:
    checkpoint = load_checkpoint(tiny_llama_dir, torch.float32)
    calibration = torch.randint(0, checkpoint.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    quantized, report = awq_quantize(
        checkpoint.config, checkpoint.weights, calibration, AWQSettings(group_size=GROUP_SIZE, grid_points=5, batch_sequences=3)
    )
    int4 = {name for name, value in quantized.items() if isinstance(value, Int4Weight)}
    assert int4 == {name for name in checkpoint.weights if name.endswith("proj.weight")}
    assert set(quantized) == set(checkpoint.weights)
    assert all(error <= minmax for error, minmax in report.errors.values())
    assert len(report.alphas) == checkpoint.config.num_layers * 3
    # Close to the float model (with the norms left unscaled the same check gives about 0.26).
    ids = calibration[:2]
    dense = {name: dequantize(v) if isinstance(v, Int4Weight) else v for name, v in quantized.items()}
    reference = torch.softmax(forward_logits(checkpoint.config, checkpoint.weights, ids), -1)
    ours = torch.softmax(forward_logits(checkpoint.config, dense, ids), -1)
    assert (reference - ours).abs().sum(-1).max() < 0.15


def partial_errors(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """[out, groups] mean squared error of each group's partial outputs x_g w_gᵀ."""
    xg = x.reshape(x.shape[0], -1, GROUP_SIZE)
    exact = torch.einsum("ngk,ogk->ogn", xg, weight.reshape(weight.shape[0], -1, GROUP_SIZE))
    rounded = torch.einsum("ngk,ogk->ogn", xg, quantized.reshape(weight.shape[0], -1, GROUP_SIZE))
    return (rounded - exact).pow(2).mean(-1)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1.0, 20.0))
def test_clipping_is_never_worse_per_group_and_gains_on_outlier_weights(seed: int, outlier: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 2 * GROUP_SIZE, generator=generator)
    weight = torch.randn(16, 2 * GROUP_SIZE, generator=generator)
    weight[torch.rand(weight.shape, generator=generator) < 0.02] *= outlier
    clipped = clip_weight(weight, x, GROUP_SIZE, steps=10, max_shrink=0.5)
    assert (clipped.abs() <= weight.abs() + 1e-6).all()
    ours = partial_errors(x, weight, dequantize(quantize_int4(clipped, GROUP_SIZE)))
    plain = partial_errors(x, weight, dequantize(quantize_int4(weight, GROUP_SIZE)))
    assert (ours <= plain * (1 + 1e-5)).all()
    if outlier >= 5:
        assert ours.sum() < plain.sum()
