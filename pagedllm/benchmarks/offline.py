"""`pagedllm bench offline`: pagedllm's own prefill and decode throughput, in-process, measured as the peers are."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from typing import Any

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks import results
from pagedllm.benchmarks.report import format_offline
from pagedllm.benchmarks.throughput import (
    DECODE_BATCH_SIZES,
    DECODE_NEW_TOKENS,
    DECODE_PROMPT_LEN,
    PREFILL_PROMPT_LENS,
    GenerateFn,
    PromptSource,
    int_tuple,
    measure,
)
from pagedllm.config import EngineConfig

FLAG_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}
# EngineConfig fields that are not engine flags here: --model is the benchmark's, --seed seeds the prompts.
NOT_ENGINE_FLAGS = ("model", "seed")


def engine_generate_fn(llm: LLM) -> GenerateFn:
    """`LLM.generate` with greedy sampling that ignores EOS, checked to produce exactly the asked length."""

    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for output in llm.generate(prompts, params):
            produced = len(output.outputs[0].token_ids)
            if produced != new_tokens:
                raise RuntimeError(f"pagedllm generated {produced} tokens, not {new_tokens}")

    return generate


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields from the flags; batch and token budgets default to what the largest point needs."""
    settings = {
        name: getattr(args, name)
        for name in EngineConfig.field_names()
        if name not in NOT_ENGINE_FLAGS and getattr(args, name, None) is not None
    }
    settings.setdefault("max_num_seqs", max(args.batch_sizes))
    settings.setdefault("max_num_batched_tokens", max(*args.prompt_lens, max(args.batch_sizes) * DECODE_PROMPT_LEN))
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="GGUF file, HF folder or embedded model name (default: smollm2-135m-instruct)"
    )
    parser.add_argument(
        "--prompt-lens", type=int_tuple, default=PREFILL_PROMPT_LENS, help="prefill prompt lengths, e.g. 128,512,2048"
    )
    parser.add_argument("--batch-sizes", type=int_tuple, default=DECODE_BATCH_SIZES, help="decode batch sizes, e.g. 1,8,32,64")
    parser.add_argument("--decode-tokens", type=int, default=DECODE_NEW_TOKENS, help="tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (the median is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    results.add_output_argument(parser)
    engine = parser.add_argument_group("engine")
    for config_field in fields(EngineConfig):
        if config_field.name in NOT_ENGINE_FLAGS:
            continue
        flag = "--" + config_field.name.replace("_", "-")
        # config.py postpones annotations, so the type is text such as "int | None".
        kind = FLAG_TYPES.get(str(config_field.type).split("|")[0].strip(), str)
        engine.add_argument(flag, dest=config_field.name, type=kind, default=None, help=config_field.metadata.get("help"))


def run(args: argparse.Namespace) -> int:
    settings = engine_settings(args)
    llm = LLM(model=args.model, **settings)
    tokenizer = llm.tokenizer
    source = PromptSource(tokenizer.vocab_size, tokenizer.special_ids, args.seed)
    throughput = measure(
        engine_generate_fn(llm),
        source,
        args.prompt_lens,
        args.batch_sizes,
        args.repeats,
        DECODE_PROMPT_LEN,
        args.decode_tokens,
        "pagedllm",
    )
    print(format_offline("pagedllm", throughput))
    run_settings = {
        "model": args.model, "engine": settings, "prompt_lens": list(args.prompt_lens), "batch_sizes": list(args.batch_sizes),
        "decode_tokens": args.decode_tokens, "decode_prompt_len": DECODE_PROMPT_LEN, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    output = args.output_json or results.default_results_path()
    results.append_run(output, results.new_run("offline", "pagedllm", run_settings, asdict(throughput)))
    print(f"results appended to {output}")
    return 0
