"""Sliding-window perplexity computed through the engine, so quantized weights and KV cache are what is measured."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import TextTokenizer
from pagedllm.config import EngineConfig
from pagedllm.errors import InvalidArgumentError
from pagedllm.evaluation.corpus import evaluation_tokens
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams

# About 40k tokens run at the default window and stride: a few minutes per setting on 2 cores.
DEFAULT_MAX_TOKENS = 20_480
DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) run as one prompt; of them, [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    seconds: float


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The standard strided evaluation: windows start every `stride` tokens and each scores only the tokens
    the previous ones did not, so every token but the first is scored once with up to `window` of context."""
    if window < 2 or not 1 <= stride <= window:
        raise InvalidArgumentError(
            f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}", "window"
        )
    if num_tokens < 2:
        raise InvalidArgumentError(f"need at least 2 tokens to score, got {num_tokens}", "max_tokens")
    windows = []
    scored_until = 1  # the first token has no context to be predicted from
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def scored_prompt_logprobs(
    llm: LLM, token_ids: list[int], window: int, stride: int, num_logprobs: int = 0
) -> tuple[list[dict[int, float]], int, float]:
    """The prompt logprobs that score each token but the first (entry p - 1 predicts token p; each holds the token's
    and the `num_logprobs` most likely tokens' logprobs), the windows run and the seconds taken.

    Every window is one request with prompt logprobs, all submitted at once."""
    windows = sliding_windows(len(token_ids), window, stride)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=num_logprobs)
    started = time.perf_counter()
    outputs = llm.generate([token_ids[w.begin : w.end] for w in windows], params, use_tqdm=True)
    seconds = time.perf_counter() - started
    scored: list[dict[int, float]] = []
    for w, output in zip(windows, outputs, strict=True):
        entries = output.prompt_logprobs or []
        if len(entries) != w.end - w.begin:
            raise RuntimeError(
                f"the engine returned {len(entries)} prompt logprobs for a window of {w.end - w.begin} tokens"
            )
        scored += [entry for entry in entries[w.first_scored - w.begin :] if entry is not None]
    if len(scored) != len(token_ids) - 1:
        raise RuntimeError(f"{len(scored)} tokens were scored, not {len(token_ids) - 1}")
    return scored, len(windows), seconds


def perplexity(llm: LLM, token_ids: list[int], window: int, stride: int) -> PerplexityResult:
    """Perplexity of `token_ids` under the engine's model."""
    scored, num_windows, seconds = scored_prompt_logprobs(llm, token_ids, window, stride)
    nll = -math.fsum(entry[token] for entry, token in zip(scored, token_ids[1:], strict=True))
    mean_nll = nll / len(scored)
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(scored), num_windows, seconds)


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """--text/--dataset, --max-tokens, --window and --stride: the tokens scored and how much context each gets."""
    corpus = parser.add_argument_group("corpus")
    source = corpus.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a UTF-8 text file to score instead of the default corpus")
    source.add_argument(
        "--dataset", choices=("sharegpt",), default="sharegpt", help="held-out ShareGPT replies (the default corpus)"
    )
    corpus.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens of the corpus to score")
    corpus.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="most tokens of context per prediction")
    corpus.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="tokens between window starts")


def corpus_tokens(tokenizer: TextTokenizer, args: argparse.Namespace) -> tuple[list[int], str]:
    """The token ids the corpus flags name, and the corpus's name for the results."""
    if args.text is not None:
        ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False)
        return ids[: args.max_tokens], str(args.text)
    return evaluation_tokens(tokenizer, args.max_tokens), "sharegpt-replies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_corpus_arguments(parser)
    parser.add_argument(
        "--output-json",
        type=Path,
        default=None,
        help="results file to append this run to (e.g. the benchmarks' results file)",
    )
    parser.add_argument("--variant", default=None, help="name of these engine settings in the results (e.g. int8)")
    # A prefix-cache hit would skip the prompt logprobs of the tokens it serves.
    add_dataclass_arguments(parser.add_argument_group("engine"), EngineConfig, exclude=("enable_prefix_caching",))


def run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(EngineConfig, args, enable_prefix_caching=False)
    llm = LLM(**asdict(config))
    token_ids, corpus = corpus_tokens(llm.tokenizer, args)
    result = perplexity(llm, token_ids, args.window, args.stride)
    settings = {
        "model": llm.engine.model_name, "corpus": corpus, "window": args.window, "stride": args.stride,
        "variant": args.variant, **asdict(config),
    }  # fmt: skip
    if args.output_json is not None:
        results.append_run(args.output_json, results.new_run("perplexity", "pagedllm", settings, asdict(result)))
    print(
        f"{llm.engine.model_name}: perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens "
        f"(window {args.window}, stride {args.stride}, dtype {config.dtype}, quantization {config.quantization}, "
        f"kv {config.kv_cache_dtype}) in {result.seconds:.1f}s"
    )
    return 0
