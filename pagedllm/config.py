"""Configuration dataclasses: the single source of truth for engine settings, validated once."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from pagedllm.cpu import native_bfloat16_matmul
from pagedllm.errors import ConfigError
from pagedllm.spec_decode.config import SpeculativeConfig

# The allowed values of enumerated settings: the CLI lists them as choices and EngineConfig checks them.
AttentionImpl = Literal["fast", "reference"]
Quantization = Literal["auto", "none", "int8", "int4"]
KVCacheDtype = Literal["auto", "int8", "int4"]
KVCachePolicy = Literal["full", "streaming", "h2o"]
ModelDtype = Literal["auto", "float32", "bfloat16"]
# Input channels per int4 scale and min: the group sizes every int4 kernel takes.
QuantGroupSize = Literal[32, 64, 128, 256]
# Where the ranks of a model run: this process, a worker process per rank, or Ray actors.
ExecutorBackend = Literal["uni", "mp", "ray"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
QUANT_GROUP_SIZES: tuple[int, ...] = get_args(QuantGroupSize)
EXECUTOR_BACKENDS: tuple[str, ...] = get_args(ExecutorBackend)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype setting's torch dtype: `auto` is bfloat16 where the CPU multiplies it natively, else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16_matmul() else torch.float32
    return DTYPES[name]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Llama 3 ('llama3') or linear interpolation ('linear') define it."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from the checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # keys a query sees, itself included, in the layers that have a window
    full_attention_layers: tuple[int, ...] = ()  # layers that see the whole context although sliding_window is set
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers where it differs (Gemma 3)
    local_rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # their scaling, with rope_local_theta
    query_pre_attn_scalar: float | None = None  # queries scaled by its inverse square root (Gemma 3), else head_dim's
    final_logit_softcapping: float | None = None  # logits become cap * tanh(logits / cap) (Gemma 3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def layer_sliding_window(self, layer: int) -> int | None:
        """The window of a layer's attention, None where it sees the whole context."""
        return None if layer in self.full_attention_layers else self.sliding_window

    def layer_sliding_windows(self) -> list[int | None]:
        return [self.layer_sliding_window(layer) for layer in range(self.num_layers)]


@dataclass
class EngineConfig:
    """Every setting of an engine; the Python API, the CLI flags and the server use these names."""

    model: str | None = field(
        default=None, metadata={"help": "GGUF file, HF folder or embedded model name (default: smollm2-135m-instruct)"}
    )
    dtype: ModelDtype = field(
        default="auto",
        metadata={
            "help": "activations, dense weights and the KV cache: auto (bfloat16 on CPUs with AMX or AVX512-BF16, "
            "else float32), bfloat16 or float32"
        },
    )
    max_model_len: int | None = field(default=None, metadata={"help": "context window (default: the model's)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    kv_cache_memory: float = field(
        default=0.1, metadata={"help": "KV-cache budget: bytes if > 1, else a fraction of available RAM"}
    )
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int = field(
        default=4096, metadata={"help": "most tokens (prefill chunks + decodes) in one step"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampler for requests without their own"})
    attention_impl: AttentionImpl = field(
        default="fast", metadata={"help": "paged attention: fast (the kernels) or reference (plain PyTorch)"}
    )
    fused_decode: bool = field(
        default=True, metadata={"help": "on CPU, run every decoder layer of an all-decode step in one kernel call"}
    )
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse the KV blocks of known prefixes"})
    quantization: Quantization = field(
        default="auto",
        metadata={
            "help": "linear weights: auto (GGUF Q4_0/Q4_1 projections as int4, Q4_K/Q5_K/Q6_K/Q5_0/Q8_0 as the file's "
            "blocks), none, int8 or int4"
        },
    )
    quant_group_size: QuantGroupSize = field(
        default=128, metadata={"help": "input channels per int4 scale and zero point"}
    )
    dense_matmul_min_rows: int | None = field(
        default=None,
        metadata={
            "help": "steps with at least this many tokens multiply by a dense copy of quantized weights; 0: keep none "
            "(default: none for GGUF blocks; 8 on CPUs with AMX, else none for int4, and for int8 16 on CPUs with "
            "AVX512-BF16, else 65, past its kernel's 64 rows)"
        },
    )
    kv_cache_dtype: KVCacheDtype = field(
        default="auto", metadata={"help": "KV cache: auto (the model dtype), int8 or int4"}
    )
    kv_cache_policy: KVCachePolicy = field(
        default="full",
        metadata={
            "help": "what a sequence's KV cache keeps: full (every token), streaming (StreamingLLM: the first "
            "attention_sinks tokens and the kv_window most recent ones) or h2o (Heavy-Hitter Oracle: kv_budget "
            "tokens, the most recent half and the rest with the largest accumulated attention); the last two count "
            "positions within the cache, so a sequence can run past max_model_len in constant memory"
        },
    )
    kv_window: int = field(
        default=1024, metadata={"help": "streaming: the most recent tokens each query sees, itself included"}
    )
    attention_sinks: int = field(
        default=4, metadata={"help": "streaming: the first tokens of a sequence that stay in its cache"}
    )
    kv_budget: int = field(
        default=1024,
        metadata={"help": "h2o: the most tokens each query sees, itself included (recent ones and heavy hitters)"},
    )
    device: str = field(
        default="cpu", metadata={"help": "torch device of the weights, KV cache and sampler (cpu, cuda, cuda:1...)"}
    )
    num_threads: int = field(
        default=0,
        metadata={
            "help": "torch threads for the math, per rank (0: every core this process may use, shared among ranks)"
        },
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "ranks that split every layer (heads, channels, vocabulary) between them"}
    )
    pipeline_parallel_size: int = field(
        default=1, metadata={"help": "stages that split the layers between them, each of tensor_parallel_size ranks"}
    )
    pipeline_micro_batches: bool = field(
        default=True,
        metadata={
            "help": "with pipeline_parallel_size > 1, keep one scheduled batch in flight per stage (each of its share "
            "of the sequences) so that every stage works at once; off: one step at a time through every stage"
        },
    )
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "engine replicas, each a process (a Ray actor under distributed_executor_backend ray) with its "
            "own model and scheduler; a request goes to the one that has its prompt's prefix cached, else to the one "
            "with the fewest in flight (see prefix_affinity_min_tokens); each replica runs tensor_parallel_size x "
            "pipeline_parallel_size ranks of its own"
        },
    )
    prefix_affinity_min_tokens: int = field(
        default=64,
        metadata={
            "help": "data parallel: a request goes to the replica it shares the longest cached prompt prefix with when "
            "that prefix has at least this many tokens (whole blocks), else to the least-loaded replica"
        },
    )
    prefix_affinity_max_load_gap: int = field(
        default=8,
        metadata={
            "help": "data parallel: a replica with more than this many requests in flight beyond the least-loaded "
            "one's gets no request for its cached prefix"
        },
    )
    distributed_executor_backend: ExecutorBackend | None = field(
        default=None,
        metadata={
            "help": "where ranks (or replicas) run: uni (this process), mp (a worker process per rank of this host) "
            "or ray (a Ray actor per rank or replica, over the nodes of a Ray cluster); default: uni for one rank, "
            "else mp"
        },
    )
    nnodes: int = field(
        default=1,
        metadata={
            "help": "machines the mp executor's ranks span, tensor_parallel_size / nnodes on each; node 0 runs the "
            "engine, the others `pagedllm serve --headless`"
        },
    )
    node_rank: int = field(default=0, metadata={"help": "this machine's index among nnodes (0: the engine's)"})
    master_addr: str = field(
        default="127.0.0.1", metadata={"help": "node 0's address, where the ranks of every node meet"}
    )
    master_port: int = field(
        default=0, metadata={"help": "node 0's port for the ranks to meet at (0: any free port, one node only)"}
    )
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'speculative decoding, a JSON object: {"method": "ngram" | "suffix" | "draft_model", '
            '"num_speculative_tokens": 5, ...} (vLLM\'s names)'
        },
    )

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        for name, choices in _choices(EngineConfig).items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}", name)
        draft_quantization = getattr(self.speculative_config, "quantization", None)
        if draft_quantization not in (None, *QUANTIZATIONS):
            raise ConfigError(
                f"speculative_config.quantization must be one of {QUANTIZATIONS}, got {draft_quantization!r}",
                "quantization",
            )
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ConfigError(f"device {self.device!r} is not a torch device: {error}", "device") from error
        if (self.dense_matmul_min_rows or 0) < 0 or self.num_threads < 0:
            raise ConfigError("dense_matmul_min_rows and num_threads must be >= 0")
        _require_positive(self, "block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory")
        self._check_parallel()
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}", "max_model_len")
        _require_positive(self, "kv_window", "kv_budget")
        if self.attention_sinks < 0:
            raise ConfigError(f"attention_sinks must be >= 0, got {self.attention_sinks}", "attention_sinks")
        if self.kv_cache_policy != "full":
            self._check_eviction()

    def _check_eviction(self) -> None:
        """The settings the evicting policies do not compose with yet."""
        policy = self.kv_cache_policy
        if self.speculative_config is not None:
            raise ConfigError(f"kv_cache_policy {policy} does not take speculative decoding yet", "speculative_config")

    def _check_parallel(self) -> None:
        _require_positive(self, "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")
        for name in ("prefix_affinity_min_tokens", "prefix_affinity_max_load_gap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        backend = self.distributed_executor_backend
        if self.data_parallel_size > 1 and self.nnodes > 1:
            raise ConfigError(
                "data_parallel_size > 1 runs its replicas on this machine, or on a Ray cluster's nodes "
                "(distributed_executor_backend ray): nnodes must be 1",
                "data_parallel_size",
            )
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ConfigError(
                f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}",
                "distributed_executor_backend",
            )
        if backend == "uni" and self.world_size > 1:
            raise ConfigError(
                "tensor_parallel_size or pipeline_parallel_size > 1 needs distributed_executor_backend mp or ray",
                "distributed_executor_backend",
            )
        self._check_nodes()
        if self.executor_backend != "uni" and self.data_parallel_size == 1:
            # The ranks run the target's forward alone: a draft model and an evicting policy's K/V moves (and
            # h2o's attention scores) would have to run on every rank too.
            workers = f"worker processes (distributed_executor_backend {self.executor_backend})"
            if getattr(self.speculative_config, "method", None) == "draft_model":
                raise ConfigError(
                    f"draft_model speculation does not run in {workers} yet",
                    "speculative_config",
                )
            if self.kv_cache_policy != "full":
                raise ConfigError(
                    f"kv_cache_policy {self.kv_cache_policy} does not run in {workers} yet",
                    "kv_cache_policy",
                )

    def _check_nodes(self) -> None:
        _require_positive(self, "nnodes")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}", "node_rank")
        if self.nnodes == 1:
            return
        if self.executor_backend != "mp":
            raise ConfigError(
                "nnodes > 1 runs the ranks of the mp executor; a Ray cluster places its own (distributed_executor_"
                "backend ray, nnodes 1)",
                "nnodes",
            )
        if self.world_size % self.nnodes:
            raise ConfigError(
                f"the {self.world_size} ranks (tensor_parallel_size x pipeline_parallel_size) must split evenly among "
                f"nnodes ({self.nnodes})",
                "nnodes",
            )
        if self.master_port == 0:
            raise ConfigError("nnodes > 1 needs the master_port every node's ranks meet at", "master_port")

    @property
    def executor_backend(self) -> str:
        """distributed_executor_backend, its default resolved: uni for one rank, else mp."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"

    @property
    def world_size(self) -> int:
        """Ranks that hold the model: tensor_parallel_size in each of pipeline_parallel_size stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    def kv_cache_bytes(self) -> int:
        """The KV-cache budget in bytes (a fraction is taken of the RAM available now)."""
        if self.kv_cache_memory > 1:
            return int(self.kv_cache_memory)
        return int(self.kv_cache_memory * available_memory_bytes())

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        unknown = set(kwargs) - set(cls.field_names())
        if unknown:
            raise ConfigError(f"unknown engine setting(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)


@functools.cache
def _choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The allowed values of each Literal-typed field of a dataclass."""
    return {name: get_args(hint) for name, hint in get_type_hints(cls).items() if get_origin(hint) is Literal}


def _require_positive(config: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}", name)


def available_memory_bytes() -> int:
    """RAM available to new allocations (MemAvailable), or total RAM where /proc is absent."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
