"""An analytic model of tensor, pipeline and data parallelism across nodes, calibrated by one node's measurements.

A node is the machine measured, running the model in one process. Its times scale to another model shape by
weight bytes read per token (batch-1 decode, bound by memory bandwidth) or by FLOPs (prefill and serving, bound by
compute). Parallelism over `n` nodes then:
- TP splits every layer's compute and weights n ways and adds 2 all-reduces per layer of hidden-size vectors × tokens:
  over shared memory among a node's ranks (the cost measured by `bench allreduce`), then a ring across nodes;
- PP splits the layers into n stages and adds one point-to-point send of the hidden states per stage boundary; one
  request still passes every stage in turn, so batch-1 latency does not improve, while m micro-batches keep the
  stages busy but for the bubble (p - 1) / (m + p - 1);
- DP runs n independent replicas: throughput n times one node's, latency unchanged.
Not modelled: per-step fixed costs (scheduling, sampling), the lm_head's logits gather, overlap of communication
with compute, memory limits, and kernels that one process uses and ranks do not (the fused decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["tensor", "pipeline", "data"]
STRATEGIES: tuple[Strategy, ...] = ("tensor", "pipeline", "data")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that set its weights and FLOPs."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    def layer_params(self) -> int:
        """Weights of one decoder layer's matmuls: Q, K, V, O and the gated MLP (norms are negligible)."""
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * self.hidden_size * self.intermediate_size

    def matmul_params(self) -> int:
        """Weights every token multiplies by: all layers and the lm_head."""
        return self.num_layers * self.layer_params() + self.vocab_size * self.hidden_size

    def stored_params(self) -> int:
        """Weights held: the matmuls, and the embedding where it is not the lm_head's."""
        return self.matmul_params() + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    def flops_per_token(self, context: float) -> float:
        """Multiply-adds × 2 of one token attending to `context` earlier tokens."""
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * context
        return 2 * self.matmul_params() + attention


# Llama 3 8B's shape: about 8.03e9 weights.
LLAMA_8B = ModelShape("8B Llama-shaped", 4096, 32, 32, 8, 128, 14336, 128256, False)


@dataclass(frozen=True)
class LinearCost:
    """seconds(bytes) = latency_s + bytes × seconds_per_byte."""

    latency_s: float
    seconds_per_byte: float

    def __call__(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes * self.seconds_per_byte

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> LinearCost:
        """Least squares over (bytes, seconds) points, both terms kept >= 0."""
        if len(points) < 2:
            raise ValueError("a linear fit needs at least 2 points")
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        spread = sum((x - mean_x) ** 2 for x, _ in points)
        slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / spread) if spread else 0.0
        return cls(max(0.0, mean_y - slope * mean_x), slope)


@dataclass(frozen=True)
class Network:
    """The link between nodes: one message of b bytes takes latency_s + 8b / bandwidth_bits_per_s."""

    bandwidth_bits_per_s: float = 25e9
    latency_s: float = 20e-6

    def send_s(self, num_bytes: float) -> float:
        return self.latency_s + 8 * num_bytes / self.bandwidth_bits_per_s

    def ring_all_reduce_s(self, num_bytes: float, nodes: int) -> float:
        """Reduce-scatter then all-gather around a ring: 2(n - 1) messages of bytes / n each."""
        if nodes == 1:
            return 0.0
        return 2 * (nodes - 1) * self.send_s(num_bytes / nodes)


@dataclass(frozen=True)
class Calibration:
    """One node's measurements of one model, in one process (and the shared-memory all-reduce among its ranks)."""

    shape: ModelShape
    bits_per_weight: float  # the quantization's, over the stored weights
    decode_step_s: float  # batch-1 decode, per token
    prefill_s: float  # one prompt of prompt_len tokens
    prompt_len: int
    serve_output_tokens_per_s: float  # the server at `concurrency` requests in flight
    concurrency: int
    intra_node_all_reduce: LinearCost
    activation_bytes: int  # per value in an all-reduce or a send
    ranks_per_node: int  # TP ranks sharing a node (and its all-reduce over shared memory)


@dataclass(frozen=True)
class Prediction:
    """What one strategy on `nodes` nodes gives one model; None where the model cannot be split that way."""

    model: str
    strategy: Strategy
    nodes: int
    decode_tokens_per_s: float | None
    prefill_s: float | None
    serve_output_tokens_per_s: float | None
    weight_bytes_per_node: float | None


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The share of a pipeline's time its stages wait: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


@dataclass(frozen=True)
class ScalingModel:
    calibration: Calibration
    network: Network
    micro_batches_per_stage: int = 4

    def decode_step_s(self, shape: ModelShape) -> float:
        """One node's batch-1 decode step: the measured one × weight bytes read per token."""
        return self.calibration.decode_step_s * shape.matmul_params() / self.calibration.shape.matmul_params()

    def _flops_ratio(self, shape: ModelShape) -> float:
        context = self.calibration.prompt_len / 2
        return shape.flops_per_token(context) / self.calibration.shape.flops_per_token(context)

    def prefill_s(self, shape: ModelShape) -> float:
        """One node's prefill of prompt_len tokens: the measured one × FLOPs."""
        return self.calibration.prefill_s * self._flops_ratio(shape)

    def serve_step_s(self, shape: ModelShape) -> float:
        """One node's time per step of `concurrency` tokens while serving: measured, × FLOPs."""
        calibration = self.calibration
        return calibration.concurrency / calibration.serve_output_tokens_per_s * self._flops_ratio(shape)

    def weight_bytes(self, shape: ModelShape) -> float:
        return shape.stored_params() * self.calibration.bits_per_weight / 8

    def all_reduce_s(self, shape: ModelShape, tokens: int, nodes: int) -> float:
        """One TP all-reduce of tokens × hidden values: among a node's ranks, then across nodes."""
        num_bytes = tokens * shape.hidden_size * self.calibration.activation_bytes
        intra = self.calibration.intra_node_all_reduce(num_bytes) if self.calibration.ranks_per_node > 1 else 0.0
        return intra + self.network.ring_all_reduce_s(num_bytes, nodes)

    def send_s(self, shape: ModelShape, tokens: int) -> float:
        """One stage boundary's send of tokens × hidden values, node to node."""
        return self.network.send_s(tokens * shape.hidden_size * self.calibration.activation_bytes)

    def tensor(self, shape: ModelShape, nodes: int) -> Prediction:
        if nodes * self.calibration.ranks_per_node > shape.num_heads:
            return Prediction(shape.name, "tensor", nodes, None, None, None, None)
        concurrency, prompt_len = self.calibration.concurrency, self.calibration.prompt_len

        def step_s(compute_s: float, tokens: int) -> float:
            return compute_s / nodes + 2 * shape.num_layers * self.all_reduce_s(shape, tokens, nodes)

        return Prediction(
            shape.name,
            "tensor",
            nodes,
            1 / step_s(self.decode_step_s(shape), 1),
            step_s(self.prefill_s(shape), prompt_len),
            concurrency / step_s(self.serve_step_s(shape), concurrency),
            self.weight_bytes(shape) / nodes,
        )

    def pipeline(self, shape: ModelShape, stages: int) -> Prediction:
        if stages > shape.num_layers:
            return Prediction(shape.name, "pipeline", stages, None, None, None, None)
        concurrency, prompt_len = self.calibration.concurrency, self.calibration.prompt_len
        boundaries = stages - 1
        decode_s = self.decode_step_s(shape) + boundaries * self.send_s(shape, 1)
        prefill_s = self.prefill_s(shape) + boundaries * self.send_s(shape, prompt_len)
        stage_s = self.serve_step_s(shape) / stages + (self.send_s(shape, concurrency) if boundaries else 0.0)
        busy = 1 - bubble_fraction(stages, self.micro_batches_per_stage * stages)
        return Prediction(
            shape.name,
            "pipeline",
            stages,
            1 / decode_s,
            prefill_s,
            concurrency / stage_s * busy,
            self.weight_bytes(shape) / stages,
        )

    def data(self, shape: ModelShape, replicas: int) -> Prediction:
        concurrency = self.calibration.concurrency
        return Prediction(
            shape.name,
            "data",
            replicas,
            1 / self.decode_step_s(shape),
            self.prefill_s(shape),
            replicas * concurrency / self.serve_step_s(shape),
            self.weight_bytes(shape),
        )

    def predict(self, shape: ModelShape, strategy: Strategy, nodes: int) -> Prediction:
        return {"tensor": self.tensor, "pipeline": self.pipeline, "data": self.data}[strategy](shape, nodes)
