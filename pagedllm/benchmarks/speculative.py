"""`pagedllm bench spec`: decode with speculation off and on, on plain ShareGPT chat and on an input-grounded set
(ShareGPT replies handed back to be repeated or lightly edited), at batch 1 and with many requests at once, counting
identical outputs; beside them llama.cpp's batch-1 decode (llama-bench tg) on the same file. A model without a chat
template (a base model) gets the same material as plain completion text."""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import TextTokenizer, load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.peers import llama_cpp_binary, run_llama_bench
from pagedllm.benchmarks.size_suite import SIZE_MODELS
from pagedllm.config import EngineConfig
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.model.registry import model_display_name, resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

# Instructions whose answer copies most of its input: what prompt lookup and suffix decoding are for.
GROUNDED_INSTRUCTIONS = (
    "Repeat the following text exactly, without any comment:",
    "Fix any spelling mistakes in the following text and give back the whole text, otherwise unchanged:",
    "Give back the following text with its first sentence rewritten and everything else unchanged:",
)
CODE_INSTRUCTION = "Add a one-line comment at the top of the following code and give back all of it unchanged:"
PROMPT_SETS = ("chat", "grounded")
PromptFormat = Literal["chat", "completion"]
# A base model's prompt: the question or the grounded instruction and text, then a cue to answer.
COMPLETION_PROMPT = "{text}\n\nAnswer:\n"
DEFAULT_SPECULATIVE_CONFIG = '{"method": "ngram", "num_speculative_tokens": 5}'
LLAMA_BENCH_REPETITIONS = 3
CONCURRENT_ROUNDS = 3  # off/on rounds of the requests at once


@dataclass(frozen=True)
class SpecRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class SpecPoint:
    """One prompt set under one setting: its requests one at a time (concurrency 1) or all at once."""

    prompt_set: str
    speculation: str
    num_requests: int
    output_tokens: int
    seconds: float
    decode_seconds: float  # from each request's first token to its last (concurrency 1)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    identical_outputs: int = 0  # outputs token for token the same as without speculation
    concurrency: int = 1

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.output_tokens - self.num_requests) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """What the point is compared by: batch-1 decode speed, or output throughput with requests at once."""
        return self.decode_tokens_per_second if self.concurrency == 1 else self.output_tokens_per_second


def grounded_prompt(reply: str, index: int) -> str:
    """The instruction for reply number `index` (code gets its own), then the reply."""
    instruction = CODE_INSTRUCTION if "```" in reply else GROUNDED_INSTRUCTIONS[index % len(GROUNDED_INSTRUCTIONS)]
    return f"{instruction}\n\n{reply}"


def encode_prompt(tokenizer: Tokenizer | TextTokenizer, text: str, prompt_format: PromptFormat) -> list[int]:
    """The text as the user's message of a chat, or as a plain completion prompt (with the tokenizer's BOS)."""
    if prompt_format == "chat":
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return tokenizer.encode(COMPLETION_PROMPT.format(text=text), add_special_tokens=True)


def prompt_format_of(tokenizer: Tokenizer) -> PromptFormat:
    """Chat for a model with a chat template, plain completions for one without (a base model)."""
    return "chat" if tokenizer.chat_template is not None else "completion"


def build_requests(
    pairs: list[tuple[str, str]],
    prompt_set: str,
    num_requests: int,
    tokenizer: Tokenizer | TextTokenizer,
    seed: int,
    max_reply_tokens: int,
    prompt_format: PromptFormat = "chat",
) -> list[SpecRequest]:
    """Requests of ShareGPT's first question ('chat') or its answer to hand back ('grounded'), chat-templated or as
    plain completion text."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    requests = []
    for index in order:
        if len(requests) == num_requests:
            break
        question, reply = pairs[index]
        reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        if len(reply_ids) < 16:
            continue
        reply = tokenizer.decode(reply_ids[:max_reply_tokens])
        text = question if prompt_set == "chat" else grounded_prompt(reply, len(requests))
        prompt = encode_prompt(tokenizer, text, prompt_format)
        if len(prompt) > 2 * max_reply_tokens + 64:
            continue
        # A grounded answer is about as long as the reply it hands back; a little room for the edit.
        requests.append(SpecRequest(prompt, min(len(reply_ids), max_reply_tokens) + 16))
    return requests


def run_point(llm: LLM, requests: list[SpecRequest], prompt_set: str, speculation: str) -> tuple[SpecPoint, list]:
    """Run the requests one at a time with greedy sampling; the outputs come back to compare settings."""
    outputs, seconds, decode_seconds = [], 0.0, 0.0
    for request in requests:
        started = time.monotonic()
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0)
        output = llm.generate([request.prompt_token_ids], params)[0]
        finished = time.monotonic()
        seconds += finished - started
        decode_seconds += finished - (output.first_token_time or finished)
        outputs.append(output.outputs[0].token_ids)
    point = SpecPoint(prompt_set, speculation, len(requests), sum(map(len, outputs)), seconds, decode_seconds)
    return point, outputs


def run_concurrent_point(
    llm: LLM, requests: list[SpecRequest], prompt_set: str, speculation: str
) -> tuple[SpecPoint, list]:
    """All the requests at once (continuous batching), greedy; output throughput over the whole run."""
    params = [SamplingParams(max_tokens=request.max_tokens, temperature=0.0) for request in requests]
    started = time.monotonic()
    results = llm.generate([request.prompt_token_ids for request in requests], params)
    seconds = time.monotonic() - started
    outputs = [result.outputs[0].token_ids for result in results]
    point = SpecPoint(prompt_set, speculation, len(requests), sum(map(len, outputs)), seconds, 0.0)
    point.concurrency = len(requests)
    return point, outputs


def merged(results: list[tuple[SpecPoint, list]]) -> tuple[SpecPoint, list]:
    """One point of several runs of the same setting, their outputs in order."""
    points = [point for point, _ in results]
    point = SpecPoint(
        points[0].prompt_set,
        points[0].speculation,
        sum(p.num_requests for p in points),
        sum(p.output_tokens for p in points),
        sum(p.seconds for p in points),
        sum(p.decode_seconds for p in points),
    )
    return point, [tokens for _, outputs in results for tokens in outputs]


def compare(
    plain: LLM, speculating: LLM, requests: list[SpecRequest], prompt_set: str, method: str, concurrent: bool
) -> list[SpecPoint]:
    """Off and on in alternation, so that other load on the machine weighs on both alike: at batch 1 request by
    request, all at once in CONCURRENT_ROUNDS rounds (the fastest of each setting counting); with the verification
    counters (over every run) and the outputs that came out the same."""
    before = speculating.engine.stats()
    if concurrent:
        rounds = [
            (run_concurrent_point(plain, requests, prompt_set, "off"),
             run_concurrent_point(speculating, requests, prompt_set, method))
            for _ in range(CONCURRENT_ROUNDS)
        ]  # fmt: skip
        (off, expected), (on, produced) = (min((r[i] for r in rounds), key=lambda r: r[0].seconds) for i in (0, 1))
    else:
        pairs = [
            (run_point(plain, [request], prompt_set, "off"), run_point(speculating, [request], prompt_set, method))
            for request in requests
        ]
        (off, expected), (on, produced) = (merged([pair[i] for pair in pairs]) for i in (0, 1))
    after = speculating.engine.stats()
    on.draft_tokens = after.spec_decode.num_draft_tokens - before.spec_decode.num_draft_tokens
    on.accepted_tokens = after.spec_decode.num_accepted_tokens - before.spec_decode.num_accepted_tokens
    verifications = after.spec_decode.num_drafts - before.spec_decode.num_drafts
    on.acceptance_rate = on.accepted_tokens / on.draft_tokens if on.draft_tokens else 0.0
    on.mean_accepted_length = 1 + on.accepted_tokens / verifications if verifications else 0.0
    on.identical_outputs = sum(a == b for a, b in zip(produced, expected))
    return [off, on]


def llama_cpp_decode(model: str | None, threads: int, tokens: int) -> dict[str, Any] | None:
    """llama-bench's batch-1 decode (tgN) on the model's GGUF file; None where that is not a GGUF or llama.cpp is
    not built."""
    path = resolve_model_path(model or "smollm2-135m-instruct")
    try:
        llama_cpp_binary("llama-bench")
    except FileNotFoundError as error:
        logger.warning("no llama.cpp comparison: %s", error)
        return None
    if path.suffix != ".gguf":
        logger.warning("no llama.cpp comparison: %s is not a GGUF file", path)
        return None
    threads = threads or results.usable_cpu_count()
    command, throughput, _, version = run_llama_bench(path, threads, (0,), tokens, LLAMA_BENCH_REPETITIONS)
    return {"decode_tokens_per_second": throughput.decode[0].tokens_per_s, "command": command, "build": version}


def resolve_spec_model(model: str | None) -> tuple[str | None, str]:
    """The engine's model (one of `bench sizes`' names gives its file, made on first use) and its name in tables."""
    if model in SIZE_MODELS:
        size_model = SIZE_MODELS[model]
        return str(size_model.prepare()), size_model.row
    return model, model_display_name(model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=8, help="requests per prompt set")
    parser.add_argument("--max-reply-tokens", type=int, default=128, help="tokens of a reply handed back")
    parser.add_argument("--prompt-sets", default=",".join(PROMPT_SETS), help="comma-separated: chat, grounded")
    parser.add_argument(
        "--speculative-config", default=DEFAULT_SPECULATIVE_CONFIG, help="the 'on' setting, a JSON object"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="requests of each set run all at once, off and on (0: none)"
    )
    parser.add_argument(
        "--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
        help="llama-bench's batch-1 decode on the same GGUF file (where make bench-peers built it)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the ShareGPT sample")
    results.add_output_argument(parser)
    add_dataclass_arguments(parser.add_argument_group("engine"), EngineConfig, exclude=("speculative_config", "seed"))
    parser.epilog = f"--model also takes a model of bench sizes: {', '.join(SIZE_MODELS)}"


def run(args: argparse.Namespace) -> int:
    config = SpeculativeConfig.parse(args.speculative_config)
    if config is None:
        raise SystemExit("pagedllm: error: --speculative-config is empty")
    with sharegpt_path() as path:
        pairs = load_sharegpt_pairs(path)
    engine = dataclass_from_args(EngineConfig, args, speculative_config=None, seed=0)
    model, model_name = resolve_spec_model(engine.model)
    engine = replace(engine, model=model)
    settings: dict = {"engine": {k: v for k, v in asdict(engine).items() if k != "speculative_config"}}
    plain = LLM(**asdict(engine))
    speculating = LLM(**{**asdict(engine), "speculative_config": asdict(config)})
    prompt_format = prompt_format_of(plain.tokenizer)
    print(f"{model_name}: {prompt_format} prompts")
    prompt_sets = args.prompt_sets.split(",")
    points = []
    for prompt_set in prompt_sets:
        requests = build_requests(
            pairs, prompt_set, args.num_prompts, plain.tokenizer, args.seed, args.max_reply_tokens, prompt_format
        )
        for llm in (plain, speculating):  # one-time costs (new matmul shapes) out of the timings
            run_point(llm, requests[:1], prompt_set, "warm-up")
        points += compare(plain, speculating, requests, prompt_set, config.method, concurrent=False)
        print(format_points(points[-2:]))
    for prompt_set in prompt_sets if args.concurrency > 0 else ():
        requests = build_requests(
            pairs, prompt_set, args.concurrency, plain.tokenizer, args.seed + 1, args.max_reply_tokens, prompt_format
        )
        warm_up = [SpecRequest(request.prompt_token_ids, 4) for request in requests]
        for llm in (plain, speculating):
            run_concurrent_point(llm, warm_up, prompt_set, "warm-up")
        points += compare(plain, speculating, requests, prompt_set, config.method, concurrent=True)
        print(format_points(points[-2:]))
    llama_cpp = None
    if args.llama_cpp:
        decode_tokens = args.max_reply_tokens
        llama_cpp = llama_cpp_decode(engine.model, engine.num_threads, decode_tokens)
        if llama_cpp is not None:
            print(f"llama.cpp decode at batch 1 (llama-bench tg{decode_tokens}): "
                  f"{llama_cpp['decode_tokens_per_second']:.1f} tok/s")  # fmt: skip
    record = {"points": [point_record(p) for p in points], "llama_cpp": llama_cpp}
    settings["speculative_config"] = json.loads(args.speculative_config)
    settings["num_prompts"], settings["concurrency"] = args.num_prompts, args.concurrency
    settings["model_name"], settings["prompt_format"] = model_name, prompt_format
    output = args.output_json or results.default_results_path()
    results.append_run(output, results.new_run("speculative", "pagedllm", settings, record))
    print(f"results appended to {output}")
    return 0


def point_record(point: SpecPoint) -> dict[str, Any]:
    return {
        **asdict(point),
        "decode_tokens_per_second": point.decode_tokens_per_second,
        "output_tokens_per_second": point.output_tokens_per_second,
    }


def format_points(points: list[SpecPoint]) -> str:
    """A table: tok/s per set, concurrency and setting (batch-1 decode; output throughput at once), the speed-up
    over off, and acceptance."""
    header = f"{'set':<9}{'conc':>5}  {'speculation':<13}{'tokens':>7}{'tok/s':>9}{'speed-up':>10}"
    lines = [header + f"{'accepted':>10}{'mean len':>10}{'identical':>11}"]
    base = {(p.prompt_set, p.concurrency): p.tokens_per_second for p in points if p.speculation == "off"}
    for p in points:
        off = base.get((p.prompt_set, p.concurrency))
        speedup = p.tokens_per_second / off if off else 0.0
        accepted = f"{p.acceptance_rate:.0%}" if p.speculation != "off" else "-"
        mean_len = f"{p.mean_accepted_length:.2f}" if p.speculation != "off" else "-"
        identical = f"{p.identical_outputs}/{p.num_requests}" if p.speculation != "off" else "-"
        lines.append(
            f"{p.prompt_set:<9}{p.concurrency:>5}  {p.speculation:<13}{p.output_tokens:>7}{p.tokens_per_second:>9.1f}"
            f"{speedup:>9.2f}x{accepted:>10}{mean_len:>10}{identical:>11}"
        )
    return "\n".join(lines)
