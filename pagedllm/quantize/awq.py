"""Activation-aware int4 weight quantization (AWQ, Lin et al. 2023): per-input-channel scales from calibration.

Channels that see large activations matter most, so each group of linears sharing one input is multiplied
by s = mean|x|^α per input channel before int4 rounding, and 1/s is folded into the op that produces that
input; α is searched per group to minimise the error of the quantized group's output on calibration data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from pagedllm.config import ModelConfig
from pagedllm.layers.quantization import Int4Weight, dequantize, int4_group_size, quantize_int4
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.quantize.dense_model import Weights, embed, layer_forward, layer_prefix, make_rotary

logger = logging.getLogger(__name__)

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Clipping is not searched for q and k: the attention logits amplify their errors (AutoAWQ skips them too).
UNCLIPPED = ("self_attn.q_proj", "self_attn.k_proj")
# Keeps s finite where a channel's mean |x| is 0.
MIN_SCALE = 1e-4


@dataclass(frozen=True)
class AWQSettings:
    group_size: int = 128
    grid_points: int = 21  # α = 0, 0.05, ..., 1
    max_rows: int = 2048  # calibration rows per group kept for the output-error objective
    batch_sequences: int = 16  # calibration sequences run through a layer at once
    seed: int = 0
    clip: bool = True  # also search each group's clipping range (the paper's second step)
    clip_steps: int = 20  # ranges tried, shrinking |w| max by up to `clip_max_shrink`
    clip_max_shrink: float = 0.5
    clip_rows: int = 512


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input, and the op (a norm weight or a linear's rows) whose output that input is."""

    name: str  # as dense_model.layer_forward's capture names it
    linears: tuple[str, ...]
    previous: str
    previous_is_norm: bool


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor  # [in_features], float32
    alpha: float
    error: float  # mean squared output error of the quantized group with these scales
    minmax_error: float  # the same without scaling (α = 0: plain min-max int4)


@dataclass
class AWQReport:
    """The α chosen per layer and group, and the calibration error with and without scaling."""

    alphas: dict[str, float] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def scale_groups(config: ModelConfig, index: int) -> list[ScaleGroup]:
    """The groups of layer `index` that get scales. o_proj's input comes from v_proj only through attention,
    which is linear in v per head; its rows line up with o_proj's columns only when there is no head sharing."""
    p = layer_prefix(index)
    groups = [
        ScaleGroup("qkv", tuple(p + f"self_attn.{x}_proj" for x in "qkv"), p + "input_layernorm", True),
        ScaleGroup("gate_up", (p + "mlp.gate_proj", p + "mlp.up_proj"), p + "post_attention_layernorm", True),
        ScaleGroup("down_proj", (p + "mlp.down_proj",), p + "mlp.up_proj", False),
    ]
    if config.num_heads == config.num_kv_heads:
        groups.insert(1, ScaleGroup("o_proj", (p + "self_attn.o_proj",), p + "self_attn.v_proj", False))
    return groups


def fold_scales(weights: Weights, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the group's weight columns by `scales` and divide the previous op's output by them, in place
    in the dict (tensors are replaced, not mutated): the float model computes the same function."""
    for name in group.linears:
        weights[name + ".weight"] = weights[name + ".weight"] * scales
    weight = group.previous + ".weight"
    if group.previous_is_norm:
        weights[weight] = weights[weight] / scales
        return
    weights[weight] = weights[weight] / scales[:, None]
    bias = group.previous + ".bias"
    if bias in weights:
        weights[bias] = weights[bias] / scales


def quantization_error(x: torch.Tensor, weight: torch.Tensor, reference: torch.Tensor, scales: torch.Tensor, group_size: int) -> float:
    """Mean squared difference between x Wᵀ and (x / s) Q(W diag(s))ᵀ."""
    quantized = dequantize(quantize_int4(weight * scales, group_size)) / scales
    return (x @ quantized.T - reference).pow(2).mean().item()


def search_scales(x: torch.Tensor, mean_abs: torch.Tensor, weight: torch.Tensor, group_size: int, grid_points: int) -> ScaleSearch:
    """Grid-search α in [0, 1] for s = mean|x|^α (normalised so that max(s)·min(s) = 1) on rows x [n, in]."""
    reference = x @ weight.T
    ones = torch.ones_like(mean_abs)
    minmax_error = quantization_error(x, weight, reference, ones, group_size)
    best = ScaleSearch(ones, 0.0, minmax_error, minmax_error)
    for alpha in torch.linspace(0, 1, grid_points).tolist()[1:]:
        scales = mean_abs.clamp(min=MIN_SCALE).pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = quantization_error(x, weight, reference, scales, group_size)
        if error < best.error:
            best = ScaleSearch(scales, alpha, error, minmax_error)
    return best


def clip_weight(weight: torch.Tensor, x: torch.Tensor, group_size: int, steps: int, max_shrink: float) -> torch.Tensor:
    """Clamp each run of `group_size` weights to ±r·max|w| with the r in [1 - max_shrink, 1] that minimises
    the squared error of that group's partial outputs x_g w_gᵀ after int4 rounding, per output row."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, -1, group_size)
    x_groups = x.reshape(x.shape[0], -1, group_size)
    reference = torch.einsum("ngk,ogk->ogn", x_groups, groups)
    abs_max = groups.abs().amax(dim=2, keepdim=True)
    best_error = torch.full(abs_max.shape[:2], float("inf"))
    best_max = abs_max.clone()
    for step in range(steps):
        limit = abs_max * (1 - max_shrink * step / steps)
        clipped = torch.clamp(groups, -limit, limit)
        rounded = dequantize(quantize_int4(clipped.reshape(out_features, in_features), group_size))
        partial = torch.einsum("ngk,ogk->ogn", x_groups, rounded.reshape_as(groups))
        error = (partial - reference).pow(2).mean(dim=2)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_max = torch.where(better[..., None], limit, best_max)
    return torch.clamp(groups, -best_max, best_max).reshape(out_features, in_features)


class _GroupInputs:
    """Per-channel mean |x| over every calibration token, and a fixed sample of rows for the objective."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows  # sorted flat token indices to keep
        self.abs_sum = torch.zeros(())
        self.count = 0
        self.kept: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, first_token: int) -> None:
        flat = x.reshape(-1, x.shape[-1])
        self.abs_sum = self.abs_sum + flat.abs().sum(0)
        self.count += flat.shape[0]
        in_batch = self.rows[(self.rows >= first_token) & (self.rows < first_token + flat.shape[0])] - first_token
        self.kept.append(flat[in_batch])

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    def sample(self) -> torch.Tensor:
        return torch.cat(self.kept)


def _run_layer(
    config: ModelConfig,
    weights: Weights,
    index: int,
    hidden: torch.Tensor,
    rotary: RotaryEmbedding,
    batch_sequences: int,
    inputs: dict[str, _GroupInputs],
) -> torch.Tensor:
    """The layer's output for every calibration sequence, feeding group inputs to `inputs` on the way."""
    outputs = []
    tokens_per_sequence = hidden.shape[1]
    for start in range(0, hidden.shape[0], batch_sequences):

        def capture(name: str, x: torch.Tensor, first: int = start * tokens_per_sequence) -> None:
            if name in inputs:
                inputs[name].add(x, first)

        outputs.append(layer_forward(config, weights, index, hidden[start : start + batch_sequences], rotary, capture))
    return torch.cat(outputs)


@torch.inference_mode()
def awq_quantize(
    config: ModelConfig, weights: Weights, calibration: torch.Tensor, settings: AWQSettings
) -> tuple[dict[str, torch.Tensor | Int4Weight], AWQReport]:
    """Scale, fold and int4-quantize every decoder linear of float32 `weights`, layer by layer, over calibration
    token ids [sequences, tokens]. Returns HF-named tensors (Int4Weight for the linears; norms, embeddings
    and lm_head dense) with scales and mins rounded to float16 as a checkpoint stores them. A linear whose input
    width `settings.group_size` does not divide gets smaller groups (int4_group_size), as the engine's own int4 does."""
    working: Weights = {name: tensor.float() for name, tensor in weights.items()}
    rotary = make_rotary(config, working, calibration.shape[1])
    generator = torch.Generator().manual_seed(settings.seed)
    num_rows = calibration.numel()
    hidden = embed(working, calibration)
    report = AWQReport()
    quantized: dict[str, torch.Tensor | Int4Weight] = {}
    for index in tqdm(range(config.num_layers), desc="AWQ", unit="layer"):
        groups = scale_groups(config, index)
        rows = torch.randperm(num_rows, generator=generator)[: settings.max_rows].sort().values
        inputs = {group.name: _GroupInputs(rows) for group in groups}
        # Folding scales leaves the float layer's function unchanged, so this output feeds the next layer.
        next_hidden = _run_layer(config, working, index, hidden, rotary, settings.batch_sequences, inputs)
        chosen: dict[str, torch.Tensor] = {}
        for group in groups:
            weight = torch.cat([working[name + ".weight"] for name in group.linears])
            group_size = int4_group_size(weight.shape[1], settings.group_size)
            found = search_scales(inputs[group.name].sample(), inputs[group.name].mean_abs(), weight, group_size, settings.grid_points)
            fold_scales(working, group, found.scales)
            chosen[group.name] = found.scales
            key = f"{index}.{group.name}"
            report.alphas[key] = found.alpha
            report.errors[key] = (found.error, found.minmax_error)
            logger.debug("layer %s: alpha %.2f, error %.3g (min-max %.3g)", key, found.alpha, found.error, found.minmax_error)
        if settings.clip:
            _clip_layer(working, index, groups, inputs, chosen, settings)
        del inputs
        hidden = next_hidden
        for name in LINEAR_NAMES:
            full = layer_prefix(index) + name + ".weight"
            weight = working.pop(full)
            quantized[full] = to_storage_precision(quantize_int4(weight, int4_group_size(weight.shape[1], settings.group_size)))
    quantized.update(working)
    return quantized, report


def to_storage_precision(weight: Int4Weight) -> Int4Weight:
    """Scales and mins rounded through float16, as the checkpoint keeps them."""
    return Int4Weight(weight.q, weight.scales.half().float(), weight.mins.half().float(), weight.group_size)


def _clip_layer(
    working: Weights, index: int, groups: list[ScaleGroup], inputs: dict[str, _GroupInputs], scales: dict[str, torch.Tensor], settings: AWQSettings
) -> None:
    """Clip the folded weights of the layer's linears (but q and k) against their calibration inputs."""
    for group in groups:
        # A folded weight W diag(s) sees x / s (row scaling by a later fold does not change its input).
        scaled_x = inputs[group.name].sample()[: settings.clip_rows] / scales[group.name]
        for name in group.linears:
            if name.removeprefix(layer_prefix(index)) in UNCLIPPED:
                continue
            weight = working[name + ".weight"]
            group_size = int4_group_size(weight.shape[1], settings.group_size)
            working[name + ".weight"] = clip_weight(weight, scaled_x, group_size, settings.clip_steps, settings.clip_max_shrink)
