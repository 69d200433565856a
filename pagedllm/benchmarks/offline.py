"""`pagedllm bench offline`: pagedllm's own prefill, decode and ShareGPT throughput, in-process, measured as the
peers are."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import (
    SHAREGPT_MAX_MODEL_LEN,
    BenchmarkRequest,
    add_sharegpt_output_len_argument,
    sample_sharegpt,
    tokenized,
)
from pagedllm.benchmarks.memory import peak_rss_bytes
from pagedllm.benchmarks.report import format_offline, format_request_throughput
from pagedllm.benchmarks.throughput import (
    DECODE_BATCH_SIZES,
    DECODE_NEW_TOKENS,
    DECODE_PROMPT_LEN,
    PREFILL_PROMPT_LENS,
    SHAREGPT_NUM_PROMPTS,
    GenerateFn,
    RequestThroughput,
    int_tuple,
    measure_from_args,
)
from pagedllm.config import EngineConfig
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args


def engine_generate_fn(llm: LLM) -> GenerateFn:
    """`LLM.generate` with greedy sampling that ignores EOS, checked to produce exactly the asked length."""

    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for output in llm.generate(prompts, params):
            produced = len(output.outputs[0].token_ids)
            if produced != new_tokens:
                raise RuntimeError(f"pagedllm generated {produced} tokens, not {new_tokens}")

    return generate


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the flags, with the batch and token budgets raised to what the largest point needs."""
    needed_seqs = max(args.batch_sizes)
    needed_tokens = max(*args.prompt_lens, needed_seqs * DECODE_PROMPT_LEN)
    budgets = {
        "max_num_seqs": max(args.max_num_seqs, needed_seqs),
        "max_num_batched_tokens": max(args.max_num_batched_tokens, needed_tokens),
    }
    return dataclass_from_args(EngineConfig, args, model=args.model, **budgets)


def run_requests(llm: LLM, requests: list[BenchmarkRequest]) -> RequestThroughput:
    """Submit every request at once (greedy, EOS ignored, each its own output length); time them to the last token."""
    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
    started = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=True)
    seconds = time.perf_counter() - started
    produced = sum(len(output.outputs[0].token_ids) for output in outputs)
    expected = sum(r.output_len for r in requests)
    if produced != expected:
        raise RuntimeError(f"pagedllm generated {produced} tokens, not {expected}")
    return RequestThroughput.from_counts(len(requests), sum(r.prompt_len for r in requests), produced, seconds)


def engine_memory(llm: LLM) -> dict[str, int]:
    """Bytes of the weights and of the KV cache, the tokens the cache holds, and this process's peak RSS so far."""
    engine = llm.engine
    return {
        "weight_bytes": engine.weight_bytes,
        "kv_cache_bytes": engine.kv_cache_bytes,
        "kv_cache_tokens": engine.num_blocks * engine.config.block_size,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="GGUF file, HF folder or embedded model name (default: smollm2-135m-instruct)"
    )
    parser.add_argument(
        "--prompt-lens", type=int_tuple, default=PREFILL_PROMPT_LENS, help="prefill prompt lengths, e.g. 128,512,2048"
    )
    parser.add_argument(
        "--batch-sizes", type=int_tuple, default=DECODE_BATCH_SIZES, help="decode batch sizes, e.g. 1,8,32,64"
    )
    parser.add_argument("--decode-tokens", type=int, default=DECODE_NEW_TOKENS, help="tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=SHAREGPT_NUM_PROMPTS,
        help="ShareGPT requests submitted at once for the throughput run (0 skips it)",
    )
    add_sharegpt_output_len_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of the ShareGPT sample")
    parser.add_argument(
        "--variant",
        default=None,
        help="name of these engine settings (e.g. int8): reported beside the other variants, "
        "not as pagedllm's main row",
    )
    results.add_sizes_row_argument(parser)
    results.add_output_argument(parser)
    add_dataclass_arguments(parser.add_argument_group("engine"), EngineConfig, exclude=("model", "seed"))


def run(args: argparse.Namespace) -> int:
    config = engine_config(args)
    llm = LLM(**asdict(config))
    tokenizer = llm.tokenizer
    throughput = measure_from_args(engine_generate_fn(llm), tokenizer, args, "pagedllm")
    print(format_offline("pagedllm", throughput))
    record = asdict(throughput)
    run_settings = {
        "model": args.model,
        "engine": asdict(config),
        "prompt_lens": list(args.prompt_lens),
        "batch_sizes": list(args.batch_sizes),
        "decode_tokens": args.decode_tokens,
        "decode_prompt_len": DECODE_PROMPT_LEN,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "num_prompts": args.num_prompts,
        "sharegpt_output_len": args.sharegpt_output_len,
        "seed": args.seed,
        "variant": args.variant,
        "sizes_row": args.sizes_row,
    }  # fmt: skip
    record["memory"] = engine_memory(llm)
    if args.num_prompts > 0:
        max_len = min(SHAREGPT_MAX_MODEL_LEN, llm.engine.max_model_len)
        requests = sample_sharegpt(args.num_prompts, tokenizer, max_len, args.seed, args.sharegpt_output_len)
        sharegpt = run_requests(llm, tokenized(requests, tokenizer))
        print(format_request_throughput("pagedllm", sharegpt))
        record["sharegpt"] = asdict(sharegpt)
        run_settings["sharegpt_max_model_len"] = max_len
    output = args.output_json or results.default_results_path()
    results.append_run(output, results.new_run("offline", "pagedllm", run_settings, record))
    print(f"results appended to {output}")
    return 0
