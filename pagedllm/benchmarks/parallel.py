"""`pagedllm bench parallel`: tensor parallelism (batch-1 decode, one prefill), data and pipeline parallelism
(serving throughput; pipeline stages with and without micro-batches) on this host, each against one process with
as many threads as the ranks have together."""

from __future__ import annotations

import argparse
import asyncio
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pagedllm import LLM
from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import SHAREGPT_MAX_MODEL_LEN, BenchmarkRequest, sample_sharegpt
from pagedllm.benchmarks.markdown import markdown_table
from pagedllm.benchmarks.metrics import summarize
from pagedllm.benchmarks.offline import engine_generate_fn
from pagedllm.benchmarks.parallel_report import parallel_table
from pagedllm.benchmarks.results import ResultsFile
from pagedllm.benchmarks.serve import BACKENDS, LoadSettings, pagedllm_server, run_load, served_model_name
from pagedllm.benchmarks.server_process import free_port
from pagedllm.benchmarks.throughput import DECODE_PROMPT_LEN, PromptSource, timed
from pagedllm.config import QUANTIZATIONS
from pagedllm.model.loader import load_model_config
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer

PARTS = ("tensor", "data", "pipeline")
SETTINGS = (
    "model", "quantization", "world_size", "threads_per_rank", "prompt_len", "decode_tokens", "repeats",
    "concurrency", "num_prompts", "sharegpt_output_len", "kv_cache_memory", "seed",
)  # fmt: skip
KV_CACHE_MEMORY = 512 * 2**20  # bytes per engine (per replica): ample for these prompts, small beside the weights


@dataclass(frozen=True)
class OfflinePoint:
    """Batch-1 decode and one prefill of one engine setting, the medians of the repeats."""

    decode_tokens_per_s: float
    prefill_seconds: float


@dataclass(frozen=True)
class ServingPoint:
    """One server's output and request throughput under the concurrency cap."""

    output_tokens_per_s: float
    requests_per_s: float
    failed: int


def _ratio(parallel: float, single: float) -> float:
    return parallel / single if single else 0.0


def model_shape_record(model: str | None) -> dict[str, Any]:
    """The measured model's shape, which `bench scaling` scales from."""
    config = load_model_config(resolve_model_path(model))
    return {
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def measure_tensor_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """TP=world_size (threads_per_rank each) against one process (world_size × threads_per_rank threads), timed in
    turns so that both see the same load from the rest of the machine."""
    common: dict[str, Any] = {
        "model": args.model,
        "kv_cache_memory": args.kv_cache_memory,
        "max_num_batched_tokens": max(args.prompt_len, 2048),
    }
    if args.quantization:
        common["quantization"] = args.quantization
    single_threads = args.world_size * args.threads_per_rank
    tensor_parallel = LLM(tensor_parallel_size=args.world_size, num_threads=args.threads_per_rank, **common)
    single = LLM(num_threads=single_threads, **common)
    # Threads are set process-wide by the last engine made, so each arm sets its own engine's before it runs: the
    # single process computes on all the cores; the TP driver, which only samples, keeps its engine's num_threads
    # as a TP server's does (more threads of its own would spin against the ranks for their cores).
    arm_threads = {"single": single_threads, "tensor_parallel": args.threads_per_rank}
    source = PromptSource(single.tokenizer.vocab_size, single.tokenizer.special_ids, args.seed)
    arms = {"single": single, "tensor_parallel": tensor_parallel}
    prefill: dict[str, list[float]] = {arm: [] for arm in arms}
    short: dict[str, list[float]] = {arm: [] for arm in arms}
    long: dict[str, list[float]] = {arm: [] for arm in arms}
    call = 0
    for llm in arms.values():  # untimed calls pay for lazy initialisation (allocator, kernels, thread pools)
        engine_generate_fn(llm)(source.prompts(call, 1, args.prompt_len), 1)
        engine_generate_fn(llm)(source.prompts(call, 1, DECODE_PROMPT_LEN), 8)
    for _ in range(args.repeats):
        for arm, llm in arms.items():
            torch.set_num_threads(arm_threads[arm])
            generate = engine_generate_fn(llm)
            call += 1
            prefill[arm].append(timed(generate, source.prompts(call, 1, args.prompt_len), 1))
            call += 1
            short[arm].append(timed(generate, source.prompts(call, 1, DECODE_PROMPT_LEN), 1))
            call += 1
            long[arm].append(timed(generate, source.prompts(call, 1, DECODE_PROMPT_LEN), args.decode_tokens))
    weight_bytes = single.engine.weight_bytes
    for llm in arms.values():
        llm.engine.shutdown()
    points = {
        arm: OfflinePoint(
            (args.decode_tokens - 1) / (statistics.median(long[arm]) - statistics.median(short[arm])),
            statistics.median(prefill[arm]),
        )
        for arm in arms
    }
    return {
        "single": asdict(points["single"]),
        "tensor_parallel": asdict(points["tensor_parallel"]),
        "decode_ratio": _ratio(points["tensor_parallel"].decode_tokens_per_s, points["single"].decode_tokens_per_s),
        "prefill_ratio": _ratio(points["single"].prefill_seconds, points["tensor_parallel"].prefill_seconds),
        "weight_bytes": weight_bytes,
        "model_shape": model_shape_record(args.model),
    }


def serve_once(args: argparse.Namespace, requests: list[BenchmarkRequest], engine_args: list[str]) -> ServingPoint:
    """Start a pagedllm server with `engine_args`, load it at --concurrency, stop it."""
    extra = ["--kv-cache-memory", str(args.kv_cache_memory), *engine_args]
    if args.quantization:
        extra += ["--quantization", args.quantization]
    server = pagedllm_server(args.model, free_port(), args.concurrency, SHAREGPT_MAX_MODEL_LEN, extra)
    with server:
        settings = LoadSettings(
            base_url=server.base_url,
            model=served_model_name(server.base_url),
            backend=BACKENDS["pagedllm"],
            request_rate=float("inf"),
            max_concurrency=args.concurrency,
            seed=args.seed,
            request_timeout_s=3600.0,
        )
        result = asyncio.run(run_load(requests, settings))
    metrics = summarize(result.traces, result.duration_s)
    return ServingPoint(metrics.output_throughput, metrics.request_throughput, metrics.failed)


def measure_data_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """DP=world_size replicas (threads_per_rank each) against one replica with all their threads, through the
    server, on the same ShareGPT requests."""
    tokenizer = Tokenizer.from_model_path(resolve_model_path(args.model))
    requests = sample_sharegpt(args.num_prompts, tokenizer, SHAREGPT_MAX_MODEL_LEN, args.seed, args.sharegpt_output_len)
    single_threads = str(args.world_size * args.threads_per_rank)
    single = serve_once(args, requests, ["--num-threads", single_threads])
    data_parallel = serve_once(
        args,
        requests,
        ["--data-parallel-size", str(args.world_size), "--num-threads", str(args.threads_per_rank)],
    )
    return {
        "single": asdict(single),
        "data_parallel": asdict(data_parallel),
        "throughput_ratio": _ratio(data_parallel.output_tokens_per_s, single.output_tokens_per_s),
    }


def measure_pipeline_parallel(args: argparse.Namespace) -> dict[str, Any]:
    """PP=world_size stages (threads_per_rank each), with micro-batches and one step at a time, against one
    process with all their threads, through the server, on the same ShareGPT requests."""
    tokenizer = Tokenizer.from_model_path(resolve_model_path(args.model))
    requests = sample_sharegpt(args.num_prompts, tokenizer, SHAREGPT_MAX_MODEL_LEN, args.seed, args.sharegpt_output_len)
    single = serve_once(args, requests, ["--num-threads", str(args.world_size * args.threads_per_rank)])
    stages = ["--pipeline-parallel-size", str(args.world_size), "--num-threads", str(args.threads_per_rank)]
    micro_batches = serve_once(args, requests, stages)
    one_at_a_time = serve_once(args, requests, [*stages, "--no-pipeline-micro-batches"])
    return {
        "single": asdict(single),
        "micro_batches": asdict(micro_batches),
        "one_at_a_time": asdict(one_at_a_time),
        "throughput_ratio": _ratio(micro_batches.output_tokens_per_s, single.output_tokens_per_s),
        "one_at_a_time_ratio": _ratio(one_at_a_time.output_tokens_per_s, single.output_tokens_per_s),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts",
        type=lambda text: tuple(text.split(",")),
        default=PARTS,
        help="what to measure: tensor, data, pipeline",
    )
    parser.add_argument("--model", default=None, help="GGUF file, HF folder or embedded model name")
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, default=None, help="weight quantization (default: the engine's)"
    )
    parser.add_argument(
        "--world-size", type=int, default=2, help="tensor-parallel ranks, data-parallel replicas and pipeline stages"
    )
    parser.add_argument("--threads-per-rank", type=int, default=1, help="threads of each rank or replica")
    parser.add_argument("--prompt-len", type=int, default=512, help="TP: tokens of the timed prefill")
    parser.add_argument("--decode-tokens", type=int, default=128, help="TP: tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="TP: timed runs per point and setting (median kept)")
    parser.add_argument("--concurrency", type=int, default=16, help="DP and PP: requests in flight")
    parser.add_argument("--num-prompts", type=int, default=64, help="DP and PP: ShareGPT requests per server")
    parser.add_argument("--sharegpt-output-len", type=int, default=64, help="DP and PP: output tokens of every request")
    parser.add_argument(
        "--kv-cache-memory", type=int, default=KV_CACHE_MEMORY, help="KV-cache bytes per engine or replica"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--output-json", type=Path, default=None, help="results file to append to")


def run(args: argparse.Namespace) -> int:
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        print(f"--parts takes {', '.join(PARTS)}, not {', '.join(sorted(unknown))}")
        return 2
    record: dict[str, Any] = {}
    if "tensor" in args.parts:
        record["tensor"] = measure_tensor_parallel(args)
    if "data" in args.parts:
        record["data"] = measure_data_parallel(args)
    if "pipeline" in args.parts:
        record["pipeline"] = measure_pipeline_parallel(args)
    settings = {name: getattr(args, name) for name in SETTINGS}
    settings["parts"] = list(args.parts)
    run_record = results.new_run("parallel", "pagedllm", settings, record)
    output = args.output_json or results.default_results_path()
    results.append_run(output, run_record)
    table = parallel_table(ResultsFile(results.this_machine(), [run_record]))
    if table:
        print(markdown_table(*table))
    print(f"results appended to {output}")
    return 0
