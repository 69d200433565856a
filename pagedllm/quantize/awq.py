"""Activation-aware int4 weight quantization (AWQ, Lin et al. 2023): per-input-channel scales from calibration.

Channels that see large activations matter most, so each group of linears sharing one input is multiplied
by s = mean|x|^α per input channel before int4 rounding (or, with duo scaling, by mean|x|^α / mean|ŵ|^(1-α),
ŵ: weights relative to their group's largest), and 1/s is folded into the op that produces that input; α is
searched per group to minimise the error of the quantized group's output on calibration data. Each quantization
group's range is then clipped against the same objective. Output errors come from the inputs' second moment
E[x xᵀ], so a candidate costs one [out, in] x [in, in] product whatever the number of calibration rows.
Under GQA, o_proj's scales are tied over the query heads reading one kv head so they fold into v_proj's rows.
Layers are calibrated in order, each on the outputs of the already-quantized layers before it (as GPTQ does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from pagedllm.config import ModelConfig
from pagedllm.layers.quantization import INT4_LEVELS, Int4Weight, dequantize, int4_group_size, quantize_int4
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
# q and k are clipped less: the attention logits amplify their errors (AutoAWQ does not clip them at all).
MILDLY_CLIPPED = ("self_attn.q_proj", "self_attn.k_proj")
# The input (as dense_model.layer_forward's capture names it) each linear sees.
INPUT_OF = {
    "self_attn.q_proj": "qkv",
    "self_attn.k_proj": "qkv",
    "self_attn.v_proj": "qkv",
    "self_attn.o_proj": "o_proj",
    "mlp.gate_proj": "gate_up",
    "mlp.up_proj": "gate_up",
    "mlp.down_proj": "down_proj",
}
# Keeps s finite where a channel's mean |x| is 0.
MIN_SCALE = 1e-4


@dataclass(frozen=True)
class AWQSettings:
    group_size: int = 128
    grid_points: int = 20  # α = 0, 0.05, ..., 0.95
    duo_scaling: bool = False  # s = mean|x|^α / mean|ŵ|^(1-α) (AutoAWQ) instead of mean|x|^α
    max_rows: int = 4096  # calibration rows per group whose second moment is the objective
    batch_sequences: int = 16  # calibration sequences run through a layer at once
    seed: int = 0
    clip: bool = True  # also search each group's quantization range (the paper's second step)
    clip_steps: int = 7  # shrinks tried per end of a group's range, down to `clip_max_shrink`
    clip_max_shrink: float = 0.3
    qk_max_shrink: float = 0.0  # none or milder for q and k, whose errors the attention logits amplify
    sequential: bool = True  # calibrate each layer on the outputs of the already-quantized layers before it


@dataclass(frozen=True)
class SharedChannels:
    """Under GQA the previous op's channel (kv head j, dim d) feeds the input channels (i, d) of every query head i
    of group j, so one scale per kv channel, repeated over the group's `copies` query heads, keeps the function."""

    copies: int
    head_dim: int

    def expand(self, scales: torch.Tensor) -> torch.Tensor:
        """Per kv channel [kv_heads * head_dim] → per input channel [heads * head_dim]."""
        return scales.view(-1, 1, self.head_dim).expand(-1, self.copies, -1).reshape(-1)

    def reduce(self, per_input: torch.Tensor) -> torch.Tensor:
        """Per input channel → per kv channel: the mean over the query heads sharing it."""
        return per_input.view(-1, self.copies, self.head_dim).mean(1).reshape(-1)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input, and the op (a norm weight or a linear's rows) whose output that input is."""

    name: str  # as dense_model.layer_forward's capture names it
    linears: tuple[str, ...]
    previous: str
    previous_is_norm: bool
    shared: SharedChannels | None = None  # set where one previous-op channel feeds several input channels


def input_scales(shared: SharedChannels | None, scales: torch.Tensor) -> torch.Tensor:
    """Scales per previous-op output channel, repeated over the input channels each one feeds."""
    return scales if shared is None else shared.expand(scales)


@dataclass(frozen=True)
class ScaleSearch:
    scales: torch.Tensor  # [previous-op output channels] ([in_features] without sharing), float32
    alpha: float | None  # None where no scaling beat plain min-max int4 (the scales are then ones)
    error: float  # mean squared output error of the quantized group with these scales
    minmax_error: float  # the same without scaling (plain min-max int4)


@dataclass
class AWQReport:
    """The α chosen per layer and group, and the calibration error with and without scaling."""

    alphas: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def scale_groups(config: ModelConfig, index: int) -> list[ScaleGroup]:
    """The groups of layer `index` that get scales. o_proj's input comes from v_proj only through attention,
    which is linear in v per head: a v_proj row scales the o_proj columns of every query head reading it."""
    p = layer_prefix(index)
    copies = config.num_heads // config.num_kv_heads
    shared = SharedChannels(copies, config.head_dim) if copies > 1 else None
    return [
        ScaleGroup("qkv", tuple(p + f"self_attn.{x}_proj" for x in "qkv"), p + "input_layernorm", True),
        ScaleGroup("o_proj", (p + "self_attn.o_proj",), p + "self_attn.v_proj", False, shared),
        ScaleGroup("gate_up", (p + "mlp.gate_proj", p + "mlp.up_proj"), p + "post_attention_layernorm", True),
        ScaleGroup("down_proj", (p + "mlp.down_proj",), p + "mlp.up_proj", False),
    ]


def fold_scales(weights: Weights, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the group's weight columns by `scales` (one per previous-op output channel, repeated where shared)
    and divide the previous op's output by them, in place in the dict (tensors are replaced, not mutated): the
    float model computes the same function."""
    columns = input_scales(group.shared, scales)
    for name in group.linears:
        weights[name + ".weight"] = weights[name + ".weight"] * columns
    weight = group.previous + ".weight"
    if group.previous_is_norm:
        weights[weight] = weights[weight] / scales
        return
    weights[weight] = weights[weight] / scales[:, None]
    bias = group.previous + ".bias"
    if bias in weights:
        weights[bias] = weights[bias] / scales


def output_error(weight: torch.Tensor, approximation: torch.Tensor, moment: torch.Tensor) -> float:
    """Mean squared output error E[(x Wᵀ - x Ŵᵀ)²] per output, from the inputs' second moment E[x xᵀ] [in, in]."""
    difference = weight - approximation
    return ((difference @ moment) * difference).sum().item() / weight.shape[0]


def weight_magnitude(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input channel, the mean over output rows of |w| relative to the largest |w| of its quantization group."""
    out_features, in_features = weight.shape
    groups = weight.abs().reshape(out_features, -1, group_size)
    relative = groups / groups.amax(dim=2, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return relative.reshape(out_features, in_features).mean(0)


def candidate_scales(mean_abs: torch.Tensor, magnitude: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s = mean|x|^α / magnitude^(1-α) (mean|x|^α without a magnitude), normalised so that max(s)·min(s) = 1."""
    scales = mean_abs.clamp(min=MIN_SCALE).pow(alpha)
    if magnitude is not None:
        scales = scales / magnitude.clamp(min=MIN_SCALE).pow(1 - alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(
    moment: torch.Tensor,
    mean_abs: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    grid_points: int,
    duo_scaling: bool,
    shared: SharedChannels | None = None,
) -> ScaleSearch:
    """Grid-search α in [0, 1) for the scales that minimise the output error of min-max int4 under the inputs'
    second moment; no scaling at all is a candidate too, so the search never loses to plain min-max. With
    `shared`, input channels fed by one previous-op channel get one scale, from their mean statistics."""
    if shared is not None:
        mean_abs = shared.reduce(mean_abs)
    ones = torch.ones_like(mean_abs)
    minmax_error = output_error(weight, dequantize(quantize_int4(weight, group_size)), moment)
    best = ScaleSearch(ones, None, minmax_error, minmax_error)
    magnitude = weight_magnitude(weight, group_size) if duo_scaling else None
    if magnitude is not None and shared is not None:
        magnitude = shared.reduce(magnitude)
    for alpha in (step / grid_points for step in range(grid_points)):
        scales = candidate_scales(mean_abs, magnitude, alpha)
        columns = input_scales(shared, scales)
        error = output_error(weight, dequantize(quantize_int4(weight * columns, group_size)) / columns, moment)
        if error < best.error:
            best = ScaleSearch(scales, alpha, error, minmax_error)
    return best


def group_moments(moment: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks [groups, group_size, group_size] of a second moment: all one group's error depends on."""
    groups = moment.shape[0] // group_size
    blocks = moment.reshape(groups, group_size, groups, group_size).diagonal(dim1=0, dim2=2)
    return blocks.permute(2, 0, 1)


def _group_errors(difference: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[out, groups] output error of each group's weight difference [out, groups, group_size]."""
    return torch.einsum("ogk,gkl,ogl->og", difference, blocks, difference)


def _round_to_range(groups: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Levels 0..15 nearest to each weight on the grid low + q·step ([out, groups, 1] low and step)."""
    return torch.round((groups - low) / step).clamp(0, INT4_LEVELS)


def quantize_weighted(
    weight: torch.Tensor, moment: torch.Tensor, group_size: int, clip_steps: int, max_shrink: float
) -> Int4Weight:
    """Int4 groups chosen for their output error under the inputs' second moment rather than for the weights'
    own: each group's range [min, max] is clipped to the best of [(1-a)·min, (1-b)·max] for a, b on a grid
    in [0, max_shrink]."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, -1, group_size)
    blocks = group_moments(moment, group_size)
    plain = quantize_int4(weight, group_size)
    low, step = plain.mins[..., None], plain.scales[..., None]
    levels = plain.q.float().reshape_as(groups)
    best = _group_errors(levels * step + low - groups, blocks)
    group_min, group_max = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    shrinks = torch.linspace(0, max_shrink, clip_steps).tolist()
    for low_shrink in shrinks:
        for high_shrink in shrinks:
            # Shrinking a bound towards 0 only clips when the group reaches past 0 on that side.
            new_low = torch.where(group_min < 0, group_min * (1 - low_shrink), group_min)
            new_high = torch.where(group_max > 0, group_max * (1 - high_shrink), group_max)
            new_step = (new_high - new_low) / INT4_LEVELS
            new_step = torch.where(new_step > 0, new_step, torch.ones_like(new_step))
            low, step, levels, best = _keep_better(groups, blocks, best, (low, step, levels), new_low, new_step)
    return Int4Weight(levels.to(torch.uint8).reshape(out_features, in_features), step[..., 0], low[..., 0], group_size)


def _keep_better(
    groups: torch.Tensor,
    blocks: torch.Tensor,
    best: torch.Tensor,
    current: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    new_low: torch.Tensor,
    new_step: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low, step, levels, error) per group: the current ones or the grid (new_low, new_step), whichever errs less."""
    low, step, levels = current
    new_levels = _round_to_range(groups, new_low, new_step)
    error = _group_errors(new_levels * new_step + new_low - groups, blocks)
    better = (error < best)[..., None]
    return (
        torch.where(better, new_low, low),
        torch.where(better, new_step, step),
        torch.where(better, new_levels, levels),
        torch.minimum(error, best),
    )


class _GroupInputs:
    """Per-channel mean |x| over every calibration token, and the second moment of a fixed sample of rows."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows  # sorted flat token indices to keep
        self.abs_sum = torch.zeros(())
        self.count = 0
        self.moment_sum = torch.zeros(())
        self.kept = 0

    def add(self, x: torch.Tensor, first_token: int) -> None:
        flat = x.reshape(-1, x.shape[-1])
        self.abs_sum = self.abs_sum + flat.abs().sum(0)
        self.count += flat.shape[0]
        in_batch = self.rows[(self.rows >= first_token) & (self.rows < first_token + flat.shape[0])] - first_token
        sample = flat[in_batch]
        self.moment_sum = self.moment_sum + sample.T @ sample
        self.kept += sample.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    def moment(self) -> torch.Tensor:
        """E[x xᵀ] over the sampled rows, [in, in]."""
        return self.moment_sum / self.kept


def _add_inputs(inputs: dict[str, _GroupInputs], first_token: int, name: str, x: torch.Tensor) -> None:
    inputs[name].add(x, first_token)


def _run_layer(
    config: ModelConfig,
    weights: Weights,
    index: int,
    hidden: torch.Tensor,
    rotary: RotaryEmbedding,
    batch_sequences: int,
    inputs: dict[str, _GroupInputs] | None,
) -> torch.Tensor:
    """The layer's output for every calibration sequence, feeding group inputs to `inputs` (if any) on the way."""
    outputs = []
    tokens_per_sequence = hidden.shape[1]
    for start in range(0, hidden.shape[0], batch_sequences):
        capture = None if inputs is None else partial(_add_inputs, inputs, start * tokens_per_sequence)
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
        rows = torch.randperm(num_rows, generator=generator)[: settings.max_rows].sort().values
        inputs = {name: _GroupInputs(rows) for name in set(INPUT_OF.values())}
        # Folding scales leaves the float layer's function unchanged, so without `sequential` this output feeds
        # the next layer.
        float_output = _run_layer(config, working, index, hidden, rotary, settings.batch_sequences, inputs)
        # What each linear's folded weight sees: x / s, whose second moment is E[x xᵀ] / (s sᵀ).
        moments = {name: stats.moment() for name, stats in inputs.items()}
        for group in scale_groups(config, index):
            weight = torch.cat([working[name + ".weight"] for name in group.linears])
            group_size = int4_group_size(weight.shape[1], settings.group_size)
            stats = inputs[group.name]
            found = search_scales(
                moments[group.name],
                stats.mean_abs(),
                weight,
                group_size,
                settings.grid_points,
                settings.duo_scaling,
                group.shared,
            )
            fold_scales(working, group, found.scales)
            columns = input_scales(group.shared, found.scales)
            moments[group.name] = moments[group.name] / (columns[:, None] * columns[None, :])
            key = f"{index}.{group.name}"
            report.alphas[key] = found.alpha
            report.errors[key] = (found.error, found.minmax_error)
            logger.debug(
                "layer %s: alpha %s, error %.3g (min-max %.3g)", key, found.alpha, found.error, found.minmax_error
            )
        del inputs
        # Only now: a later group's fold rescales the rows of an earlier group's linear (down_proj's, up_proj's).
        layer = {}
        for name in LINEAR_NAMES:
            full = layer_prefix(index) + name + ".weight"
            layer[full] = to_storage_precision(
                _quantize_linear(working.pop(full), moments[INPUT_OF[name]], name, settings)
            )
        quantized.update(layer)
        if settings.sequential:
            dense = working | {name: dequantize(weight) for name, weight in layer.items()}
            hidden = _run_layer(config, dense, index, hidden, rotary, settings.batch_sequences, None)
        else:
            hidden = float_output
    quantized.update(working)
    return quantized, report


def _quantize_linear(weight: torch.Tensor, moment: torch.Tensor, name: str, settings: AWQSettings) -> Int4Weight:
    group_size = int4_group_size(weight.shape[1], settings.group_size)
    clip_steps = settings.clip_steps if settings.clip else 1
    max_shrink = settings.qk_max_shrink if name in MILDLY_CLIPPED else settings.clip_max_shrink
    return quantize_weighted(weight, moment, group_size, clip_steps, max_shrink)


def to_storage_precision(weight: Int4Weight) -> Int4Weight:
    """Scales and mins rounded through float16, as the checkpoint keeps them."""
    return Int4Weight(weight.q, weight.scales.half().float(), weight.mins.half().float(), weight.group_size)
