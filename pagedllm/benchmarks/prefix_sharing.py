"""`pagedllm bench prefix`: chats sharing a long system prompt, one after another, with prefix caching on and off."""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.config import EngineConfig
from pagedllm.engine.engine import LLMEngine
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.sampling_params import SamplingParams

SYSTEM_PROMPT_TOKENS = 1500
NUM_REQUESTS = 16
MAX_TOKENS = 8
QUESTION_TOKENS = (8, 64)  # the shortest and longest last user message drawn from ShareGPT


@dataclass
class RequestMeasure:
    """One chat request: its prompt, the prompt tokens the engine computed and those the prefix cache served."""

    prompt_tokens: int
    computed_prefill_tokens: int
    cache_hit_tokens: int
    ttft_s: float


@dataclass
class ModeSummary:
    computed_prefill_tokens: int
    first_ttft_s: float
    median_later_ttft_s: float  # requests 2..N


def shared_prefix_chats(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, system_tokens: int, num_requests: int, seed: int
) -> list[list[dict[str, str]]]:
    """`num_requests` conversations with one system prompt of about `system_tokens` tokens of ShareGPT answers,
    each ending in a different short ShareGPT question."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    paragraphs: list[str] = []
    questions: list[str] = []
    used = 0
    for index in order:
        prompt, answer = pairs[index]
        answer_len = len(tokenizer.encode(answer, add_special_tokens=False))
        if used + answer_len <= system_tokens:
            paragraphs.append(answer)
            used += answer_len
        elif len(questions) < num_requests:
            shortest, longest = QUESTION_TOKENS
            if shortest <= len(tokenizer.encode(prompt)) <= longest:
                questions.append(prompt)
        if len(questions) == num_requests and used >= 0.9 * system_tokens:
            break
    if len(questions) < num_requests or used < 0.9 * system_tokens:
        raise ValueError(f"the dataset gave {used} system-prompt tokens and {len(questions)} questions; too few")
    system = "\n\n".join(paragraphs)
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]


def run_one_by_one(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, label: str) -> list[RequestMeasure]:
    """Send each prompt only after the previous one finished; measure its TTFT and computed prefill from the stats."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    measures = []
    for index, prompt in enumerate(tqdm(prompts, desc=label, unit="req")):
        before = engine.stats()
        request_id = f"{label}-{index}"
        engine.add_request(request_id, prompt, params)
        final = None
        while final is None:
            final = next((o for o in engine.step() if o.request_id == request_id and o.finished), None)
        after = engine.stats()
        assert final.first_token_time is not None
        measures.append(
            RequestMeasure(
                prompt_tokens=len(prompt),
                computed_prefill_tokens=after.prompt_tokens - before.prompt_tokens,
                cache_hit_tokens=after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
                ttft_s=final.first_token_time - final.arrival_time,
            )
        )
    return measures


def summarize(measures: list[RequestMeasure]) -> ModeSummary:
    return ModeSummary(
        computed_prefill_tokens=sum(m.computed_prefill_tokens for m in measures),
        first_ttft_s=measures[0].ttft_s,
        median_later_ttft_s=statistics.median(m.ttft_s for m in measures[1:]),
    )


def compare(cached: ModeSummary, uncached: ModeSummary) -> dict[str, float]:
    """The two headline figures: the drop in computed prefill tokens, and how much faster later requests start."""
    return {
        "prefill_tokens_drop": 1 - cached.computed_prefill_tokens / uncached.computed_prefill_tokens,
        "ttft_first_over_median_later": cached.first_ttft_s / cached.median_later_ttft_s,
        "uncached_ttft_first_over_median_later": uncached.first_ttft_s / uncached.median_later_ttft_s,
    }


def measure_mode(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, label: str) -> list[RequestMeasure]:
    # A warm-up request as long as the first but sharing no block with it (its tokens reversed): the measured
    # first request then pays for its prompt, not for one-time start-up costs of long prefills.
    run_one_by_one(engine, [prompts[0][::-1]], 2, f"{label}-warmup")
    return run_one_by_one(engine, prompts, max_tokens, label)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="GGUF file, HF folder or embedded model name (default: smollm2-135m-instruct)"
    )
    parser.add_argument(
        "--system-prompt-tokens", type=int, default=SYSTEM_PROMPT_TOKENS, help="size of the shared system prompt"
    )
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="chats sent one after another")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens generated per chat")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ShareGPT sample")
    results.add_output_argument(parser)
    add_dataclass_arguments(
        parser.add_argument_group("engine"), EngineConfig, exclude=("model", "seed", "enable_prefix_caching")
    )


def run(args: argparse.Namespace) -> int:
    if args.num_requests < 2:
        raise ValueError("--num-requests must be at least 2: the first request is compared with the later ones")
    cached_config = dataclass_from_args(EngineConfig, args, model=args.model, enable_prefix_caching=True)
    uncached_config = dataclass_from_args(EngineConfig, args, model=args.model, enable_prefix_caching=False)
    engine = LLMEngine(cached_config)
    with sharegpt_path() as path:
        pairs = load_sharegpt_pairs(path)
    chats = shared_prefix_chats(pairs, engine.tokenizer, args.system_prompt_tokens, args.num_requests, args.seed)
    prompts = [engine.tokenizer.encode_chat(chat) for chat in chats]
    cached = measure_mode(engine, prompts, args.max_tokens, "cached")
    del engine
    uncached = measure_mode(LLMEngine(uncached_config), prompts, args.max_tokens, "uncached")
    summaries = {"cached": summarize(cached), "uncached": summarize(uncached)}
    figures = compare(summaries["cached"], summaries["uncached"])
    print(format_summary(summaries, figures))
    record: dict[str, Any] = {
        **figures,
        **{f"{mode}_summary": asdict(summary) for mode, summary in summaries.items()},
        "cached_requests": [asdict(m) for m in cached],
        "uncached_requests": [asdict(m) for m in uncached],
    }
    run_settings = {
        "model": args.model, "engine": asdict(cached_config), "system_prompt_tokens": args.system_prompt_tokens,
        "num_requests": args.num_requests, "max_tokens": args.max_tokens, "seed": args.seed,
        "prompt_tokens": [len(p) for p in prompts],
    }  # fmt: skip
    output = args.output_json or results.default_results_path()
    results.append_run(output, results.new_run("prefix", "pagedllm", run_settings, record))
    print(f"results appended to {output}")
    return 0


def format_summary(summaries: dict[str, ModeSummary], figures: dict[str, float]) -> str:
    lines = [f"{'prefix caching':<16}{'prefill tokens computed':>26}{'TTFT first':>14}{'TTFT median 2..N':>20}"]
    for mode, s in summaries.items():
        first, later = s.first_ttft_s * 1e3, s.median_later_ttft_s * 1e3
        lines.append(f"{mode:<16}{s.computed_prefill_tokens:>26}{first:>12.1f}ms{later:>18.1f}ms")
    lines.append(f"computed prefill tokens drop: {figures['prefill_tokens_drop']:.1%}")
    lines.append(f"cached TTFT, first / median of the rest: {figures['ttft_first_over_median_later']:.1f}x")
    return "\n".join(lines)
