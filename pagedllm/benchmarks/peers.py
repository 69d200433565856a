"""The engines pagedllm is measured against: llama.cpp (llama-server, llama-bench) and HF transformers.

llama.cpp is built by scripts/build_llama_cpp.sh into the cache; `pagedllm bench peers` runs
llama-bench and the transformers offline benchmark and appends both to the results file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import time
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import (
    SHAREGPT_MAX_MODEL_LEN,
    BenchmarkRequest,
    add_sharegpt_output_len_argument,
    sample_sharegpt,
    tokenized,
)
from pagedllm.benchmarks.memory import run_with_peak_rss
from pagedllm.benchmarks.report import format_offline, format_request_throughput
from pagedllm.benchmarks.server_process import ServerProcess
from pagedllm.benchmarks.throughput import (
    DECODE_BATCH_SIZES,
    DECODE_NEW_TOKENS,
    DECODE_PROMPT_LEN,
    PREFILL_PROMPT_LENS,
    SHAREGPT_NUM_PROMPTS,
    DecodePoint,
    GenerateFn,
    OfflineThroughput,
    PrefillPoint,
    RequestThroughput,
    int_tuple,
    measure_from_args,
)
from pagedllm.config import MODEL_DTYPES, resolve_dtype
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer, cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
BUILD_SCRIPT = "scripts/build_llama_cpp.sh"
LLAMA_BENCH_TIMEOUT_S = 3600
HF_BATCH_SIZE = 16
PEERS = ("llama.cpp", "transformers")


def llama_cpp_bin_dir() -> Path:
    """Where scripts/build_llama_cpp.sh caches the binaries."""
    return cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "bin"


def llama_cpp_binary(name: str) -> Path:
    path = llama_cpp_bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build llama.cpp first with {BUILD_SCRIPT} (make bench-peers)")
    return path


@cache
def llama_cpp_version() -> str:
    """e.g. '0.5.0-dev (build 1, commit 0c1e570), built for avx2 avx512f avx512_vnni', from `llama-server
    --version` and the instruction sets the build script enabled."""
    completed = subprocess.run(
        [str(llama_cpp_binary("llama-server")), "--version"], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"^version: (.+)$", completed.stdout + completed.stderr, re.MULTILINE)
    return (match.group(1) if match else "unknown") + built_for()


def built_for() -> str:
    """', built for avx2 avx512f ...': the instruction sets the build script enabled in the cached binaries."""
    isa = llama_cpp_bin_dir().parent / "isa"
    return f", built for {isa.read_text().strip()}" if isa.is_file() else ""


def llama_server_command(gguf: Path, port: int, parallel: int, context_per_slot: int, threads: int) -> list[str]:
    """llama-server with `parallel` slots of `context_per_slot` tokens each, batching continuously."""
    return [
        str(llama_cpp_binary("llama-server")),
        "--model", str(gguf),
        "--threads", str(threads),
        "--parallel", str(parallel),
        "--ctx-size", str(parallel * context_per_slot),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--cont-batching",
    ]  # fmt: skip


def llama_server(gguf: Path, port: int, parallel: int, context_per_slot: int, threads: int) -> ServerProcess:
    if gguf.suffix != ".gguf":
        raise ValueError(f"llama.cpp serves GGUF files, not {gguf}")
    return ServerProcess(llama_server_command(gguf, port, parallel, context_per_slot, threads), port, "llama-server")


def llama_bench_command(
    gguf: Path, threads: int, prompt_lens: tuple[int, ...], gen_tokens: int, repetitions: int
) -> list[str]:
    return [
        str(llama_cpp_binary("llama-bench")),
        "-m", str(gguf),
        "-t", str(threads),
        "-p", ",".join(map(str, prompt_lens)),
        "-n", str(gen_tokens),
        "-r", str(repetitions),
        "-o", "json",
    ]  # fmt: skip


def parse_llama_bench_json(text: str) -> OfflineThroughput:
    """llama-bench's `-o json` tests: ppN (n_gen 0) → prefill at N, tgN (n_prompt 0) → decode at batch 1."""
    throughput = OfflineThroughput()
    for test in json.loads(text):
        if test["n_gen"] == 0:
            throughput.prefill.append(PrefillPoint(int(test["n_prompt"]), float(test["avg_ts"])))
        elif test["n_prompt"] == 0:
            throughput.decode.append(DecodePoint(1, float(test["avg_ts"])))
    return throughput


def llama_bench_version(text: str) -> str:
    """The build that produced llama-bench's `-o json` output, e.g. 'build 1 (commit 0c1e570), built for avx2'."""
    tests = json.loads(text)
    if not tests:
        return "unknown"
    return f"build {tests[0].get('build_number', '?')} (commit {tests[0].get('build_commit', '?')})" + built_for()


def run_llama_tool(command: list[str]) -> tuple[str, int]:
    """A llama.cpp tool's standard output and its peak resident memory in bytes."""
    logger.info("Running %s", " ".join(command))
    completed, peak_rss_bytes = run_with_peak_rss(command, LLAMA_BENCH_TIMEOUT_S)
    if completed.returncode != 0:
        name = Path(command[0]).name
        raise RuntimeError(f"{name} failed with status {completed.returncode}:\n{completed.stderr[-4000:]}")
    return completed.stdout, peak_rss_bytes


def run_llama_bench(
    gguf: Path, threads: int, prompt_lens: tuple[int, ...], gen_tokens: int, repetitions: int
) -> tuple[list[str], OfflineThroughput, int, str]:
    """llama-bench's prefill and batch-1 decode points, the peak RSS of its process and its build."""
    command = llama_bench_command(gguf, threads, prompt_lens, gen_tokens, repetitions)
    stdout, peak_rss_bytes = run_llama_tool(command)
    return command, parse_llama_bench_json(stdout), peak_rss_bytes, llama_bench_version(stdout)


def llama_batched_bench_command(
    gguf: Path, threads: int, batch_sizes: tuple[int, ...], prompt_len: int, gen_tokens: int
) -> list[str]:
    """Every batch size decodes `gen_tokens` after its own `prompt_len`-token prompts, in one context large enough."""
    return [
        str(llama_cpp_binary("llama-batched-bench")),
        "-m", str(gguf),
        "-t", str(threads),
        "-c", str(max(batch_sizes) * (prompt_len + gen_tokens)),
        "-b", "2048",
        "-ub", "512",
        "-npp", str(prompt_len),
        "-ntg", str(gen_tokens),
        "-npl", ",".join(map(str, batch_sizes)),
        "--output-format", "jsonl",
    ]  # fmt: skip


def parse_llama_batched_bench_jsonl(text: str) -> list[DecodePoint]:
    """llama-batched-bench's jsonl lines → decode tok/s (speed_tg: all sequences' generated tokens per second)."""
    points = []
    for line in text.splitlines():
        if line.startswith("{"):
            test = json.loads(line)
            points.append(DecodePoint(int(test["pl"]), float(test["speed_tg"])))
    return points


def llama_cpp_decode_batches(
    gguf: Path, threads: int, batch_sizes: tuple[int, ...], gen_tokens: int
) -> tuple[list[str], list[DecodePoint]] | None:
    """Decode points above batch 1 from llama-batched-bench; None where it is not built (an older cache)."""
    batched = tuple(size for size in batch_sizes if size > 1)
    if not batched:
        return None
    try:
        command = llama_batched_bench_command(gguf, threads, batched, DECODE_PROMPT_LEN, gen_tokens)
    except FileNotFoundError as error:
        logger.warning("llama.cpp decode above batch 1 is not measured: %s", error)
        return None
    stdout, _ = run_llama_tool(command)
    return command, parse_llama_batched_bench_jsonl(stdout)


def load_transformers_model(path: Path, dtype: str, threads: int) -> PreTrainedModel:
    # Imported here: transformers' model classes bring torch's compiler stack and scipy, some 140 MiB resident
    # that every other command (and the engine it measures) would otherwise carry.
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch_dtype = resolve_dtype(dtype)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    return model.eval()


def eos_pad_id(model: PreTrainedModel) -> int:
    pad_id = model.generation_config.eos_token_id
    return pad_id[0] if isinstance(pad_id, list) else pad_id


def transformers_generate_fn(model: PreTrainedModel) -> GenerateFn:
    """HF transformers' `generate`: static batching, KV cache on, greedy, exactly the asked length."""
    pad_id = eos_pad_id(model)

    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        input_ids = torch.tensor(prompts, dtype=torch.long)
        generate_exactly(model, input_ids, torch.ones_like(input_ids), new_tokens, pad_id)

    return generate


def generate_exactly(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, pad_id: int
) -> None:
    """Greedy `generate` of exactly `new_tokens` tokens per row, KV cache on."""
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
        )
    if output.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"transformers generated {output.shape[1] - input_ids.shape[1]} tokens, not {new_tokens}")


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch, padded on the left so every prompt ends where generation starts."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return input_ids, attention_mask


def batches(requests: list[BenchmarkRequest], batch_size: int) -> list[list[BenchmarkRequest]]:
    """Consecutive batches in the order sampled (static batching: a batch runs until its longest request ends)."""
    return [requests[start : start + batch_size] for start in range(0, len(requests), batch_size)]


def transformers_run_requests(
    model: PreTrainedModel, requests: list[BenchmarkRequest], batch_size: int, pad_id: int
) -> RequestThroughput:
    """Run token-id requests in static batches of `batch_size`; each batch generates its longest output length,
    but only each request's own output length counts, as a user would receive it."""
    started = time.perf_counter()
    for batch in tqdm(batches(requests, batch_size), desc="sharegpt transformers", unit="batch"):
        input_ids, attention_mask = left_padded([list(r.prompt) for r in batch], pad_id)
        generate_exactly(model, input_ids, attention_mask, max(r.output_len for r in batch), pad_id)
    seconds = time.perf_counter() - started
    return RequestThroughput.from_counts(
        len(requests), sum(r.prompt_len for r in requests), sum(r.output_len for r in requests), seconds
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of peers to run: {', '.join(PEERS)}")
    parser.add_argument(
        "--model", default=None, help="GGUF file, HF folder or embedded model name (default: the embedded model)"
    )
    parser.add_argument("--num-threads", type=int, default=results.usable_cpu_count())
    parser.add_argument(
        "--dtype",
        choices=MODEL_DTYPES,
        default="auto",
        help="transformers: weights and activations (default: pagedllm's default)",
    )
    parser.add_argument(
        "--prompt-lens", type=int_tuple, default=PREFILL_PROMPT_LENS, help="prefill prompt lengths, e.g. 128,512,2048"
    )
    parser.add_argument(
        "--batch-sizes",
        type=int_tuple,
        default=DECODE_BATCH_SIZES,
        help="decode batch sizes, e.g. 1,8,32,64 (llama.cpp: above 1 through llama-batched-bench)",
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=DECODE_NEW_TOKENS, help="tokens generated per decode run (llama-bench tgN)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=SHAREGPT_NUM_PROMPTS,
        help="transformers: ShareGPT requests for the throughput run, as `bench offline` samples them (0 skips it)",
    )
    add_sharegpt_output_len_argument(parser)
    parser.add_argument(
        "--hf-batch-size", type=int, default=HF_BATCH_SIZE, help="transformers: static batch size of the ShareGPT run"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of the ShareGPT sample")
    results.add_sizes_row_argument(parser)
    results.add_output_argument(parser)


def llama_cpp_run(args: argparse.Namespace, path: Path, settings: dict[str, Any]) -> results.Run:
    """llama-bench's prefill and batch-1 decode (with its process's peak RSS), llama-batched-bench's larger batches."""
    command, throughput, peak_rss_bytes, version = run_llama_bench(
        path, args.num_threads, args.prompt_lens, args.decode_tokens, args.repeats
    )
    run_settings = {**settings, "tool": "llama-bench", "tool_command": command}
    batched = llama_cpp_decode_batches(path, args.num_threads, args.batch_sizes, args.decode_tokens)
    if batched is not None:
        run_settings["batched_tool_command"], points = batched
        throughput.decode += points
    print(format_offline("llama.cpp", throughput))
    record = {**asdict(throughput), "memory": {"peak_rss_bytes": peak_rss_bytes}}
    return results.new_run("offline", "llama.cpp", run_settings, record, {"llama.cpp": version})


def transformers_run(args: argparse.Namespace, path: Path, settings: dict[str, Any]) -> results.Run:
    """Prefill and decode points as `bench offline` measures them, then the ShareGPT requests in static batches."""
    model = load_transformers_model(path, args.dtype, args.num_threads)
    tokenizer = Tokenizer.from_model_path(path)
    throughput = measure_from_args(transformers_generate_fn(model), tokenizer, args, "transformers")
    print(format_offline("transformers", throughput))
    record = asdict(throughput)
    run_settings = {
        **settings,
        "dtype": args.dtype,
        "batch_sizes": list(args.batch_sizes),
        "decode_prompt_len": DECODE_PROMPT_LEN,
        "num_prompts": args.num_prompts,
        "sharegpt_output_len": args.sharegpt_output_len,
        "hf_batch_size": args.hf_batch_size,
        "seed": args.seed,
    }
    if args.num_prompts > 0:
        requests = sample_sharegpt(
            args.num_prompts, tokenizer, SHAREGPT_MAX_MODEL_LEN, args.seed, args.sharegpt_output_len
        )
        pad_id = tokenizer.hf.pad_token_id if tokenizer.hf.pad_token_id is not None else eos_pad_id(model)
        sharegpt = transformers_run_requests(model, tokenized(requests, tokenizer), args.hf_batch_size, pad_id)
        print(format_request_throughput("transformers", sharegpt))
        record["sharegpt"] = asdict(sharegpt)
        run_settings["sharegpt_max_model_len"] = SHAREGPT_MAX_MODEL_LEN
    return results.new_run("offline", "transformers", run_settings, record)


def run(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    output = args.output_json or results.default_results_path()
    settings: dict[str, Any] = {
        "model": str(path),
        "threads": args.num_threads,
        "prompt_lens": list(args.prompt_lens),
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "sizes_row": args.sizes_row,
    }
    peers = [peer.strip() for peer in args.peers.split(",")]
    unknown = set(peers) - set(PEERS)
    if unknown:
        print(f"unknown peer(s) {', '.join(sorted(unknown))}: choose from {', '.join(PEERS)}")
        return 2
    for peer in peers:
        peer_run = llama_cpp_run if peer == "llama.cpp" else transformers_run
        results.append_run(output, peer_run(args, path, settings))
    print(f"results appended to {output}")
    return 0
