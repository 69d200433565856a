"""Perplexity computed through the engine, so quantized weights, KV cache and KV-cache policy are what is measured.

Under the full KV-cache policy the text is scored in strided windows, each a prompt of its own; under an evicting
policy (streaming, h2o) it is one sequence decoded token by token, every token scored from the cache the policy kept,
as StreamingLLM evaluates it. The long-answer task (`--dataset sharegpt-long-replies`) scores only the reply tokens
of held-out prompts with long replies, each record one sequence, decoded the same way under an evicting policy.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import TextTokenizer
from pagedllm.config import EngineConfig
from pagedllm.errors import InvalidArgumentError
from pagedllm.evaluation.corpus import PromptReply, conversation_tokens, evaluation_tokens, long_reply_records
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams

# About 40k tokens run at the default window and stride: a few minutes per setting on 2 cores.
DEFAULT_MAX_TOKENS = 20_480
DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512
DEFAULT_NUM_RECORDS = 8


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
    peak_kv_blocks: int  # the most KV-cache blocks in use at once


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
    return _result(llm, scored, token_ids, num_windows, seconds)


def streaming_perplexity(llm: LLM, token_ids: list[int]) -> PerplexityResult:
    """Perplexity of `token_ids` fed as one sequence, one token per step (the engine's max_num_batched_tokens must
    be 1), each scored from the KV cache its policy kept."""
    _require_token_by_token(llm)
    engine = llm.engine
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    started = time.perf_counter()
    engine.add_request("stream", token_ids, params)
    output = None
    with tqdm(total=len(token_ids), desc="Decoding", unit="tok") as progress:
        while output is None:
            finished = [o for o in engine.step() if o.finished]
            output = finished[0] if finished else None
            progress.update(engine.prompt_tokens - progress.n)
    seconds = time.perf_counter() - started
    scored = [entry for entry in output.prompt_logprobs or [] if entry is not None]
    if len(scored) != len(token_ids) - 1:
        raise RuntimeError(f"{len(scored)} tokens were scored, not {len(token_ids) - 1}")
    return _result(llm, scored, token_ids, 1, seconds)


def reply_perplexity(llm: LLM, records: list[PromptReply]) -> PerplexityResult:
    """Perplexity of the records' reply tokens, each given its prompt and the reply before it; the records run one
    after another (one token per step under an evicting policy: its max_num_batched_tokens must be 1)."""
    if llm.engine.config.kv_cache_policy != "full":
        _require_token_by_token(llm)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    started = time.perf_counter()
    outputs = llm.generate([record.token_ids for record in records], params, use_tqdm=True)
    seconds = time.perf_counter() - started
    logprobs = []
    for record, output in zip(records, outputs, strict=True):
        entries = output.prompt_logprobs or []
        if len(entries) != len(record.token_ids):
            raise RuntimeError(f"the engine returned {len(entries)} prompt logprobs for {len(record.token_ids)} tokens")
        # Entry p scores token p given the tokens before it.
        logprobs += [entries[p][record.token_ids[p]] for p in range(record.prompt_len, len(record.token_ids))]
    mean_nll = -math.fsum(logprobs) / len(logprobs)
    peak_kv_blocks = llm.engine.block_manager.allocator.peak_num_used
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(logprobs), len(records), seconds, peak_kv_blocks)


def _require_token_by_token(llm: LLM) -> None:
    if llm.engine.config.max_num_batched_tokens != 1:
        raise InvalidArgumentError("an evicting policy's perplexity feeds one token per step", "max_num_batched_tokens")


def _result(
    llm: LLM, scored: list[dict[int, float]], token_ids: list[int], num_windows: int, seconds: float
) -> PerplexityResult:
    nll = -math.fsum(entry[token] for entry, token in zip(scored, token_ids[1:], strict=True))
    mean_nll = nll / len(scored)
    peak_kv_blocks = llm.engine.block_manager.allocator.peak_num_used
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(scored), num_windows, seconds, peak_kv_blocks)


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """--text/--dataset, --max-tokens, --window and --stride: the tokens scored and how much context each gets."""
    corpus = parser.add_argument_group("corpus")
    source = corpus.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a UTF-8 text file to score instead of the default corpus")
    source.add_argument(
        "--dataset",
        choices=("sharegpt", "sharegpt-conversations", "sharegpt-long-replies"),
        default="sharegpt",
        help="held-out ShareGPT replies (the default corpus), the same conversations whole (both sides' turns), or "
        "prompts with long replies, each scored on its reply alone (--num-records of --max-tokens tokens each)",
    )
    corpus.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="tokens of the corpus to score (sharegpt-long-replies: of each record, its prompt included)",
    )
    corpus.add_argument(
        "--num-records",
        type=int,
        default=DEFAULT_NUM_RECORDS,
        help="sharegpt-long-replies: the prompts with their replies to score",
    )
    corpus.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help="most tokens of context per prediction (the full KV-cache policy; streaming keeps --kv-window)",
    )
    corpus.add_argument(
        "--stride", type=int, default=DEFAULT_STRIDE, help="tokens between window starts (the full KV-cache policy)"
    )


def corpus_tokens(tokenizer: TextTokenizer, args: argparse.Namespace) -> tuple[list[int], str]:
    """The token ids the corpus flags name, and the corpus's name for the results."""
    if args.text is not None:
        ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False)
        return ids[: args.max_tokens], str(args.text)
    if args.dataset == "sharegpt-conversations":
        return conversation_tokens(tokenizer, args.max_tokens), "sharegpt-conversations"
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
    evicting = args.kv_cache_policy != "full"
    if evicting:
        args.max_num_batched_tokens = 1  # the stream is decoded one token per step
    config = dataclass_from_args(EngineConfig, args, enable_prefix_caching=False)
    llm = LLM(**asdict(config))
    if args.dataset == "sharegpt-long-replies" and args.text is None:
        if args.num_records < 1:
            raise InvalidArgumentError(f"num_records must be >= 1, got {args.num_records}", "num_records")
        corpus = "sharegpt-long-replies"
        result = reply_perplexity(llm, long_reply_records(llm.tokenizer, args.num_records, args.max_tokens))
    else:
        token_ids, corpus = corpus_tokens(llm.tokenizer, args)
        if evicting:
            result = streaming_perplexity(llm, token_ids)
        else:
            result = perplexity(llm, token_ids, args.window, args.stride)
    context = _context(config, args, corpus)
    settings = {
        "model": llm.engine.model_name, "corpus": corpus, "window": args.window, "stride": args.stride,
        "num_records": args.num_records if corpus == "sharegpt-long-replies" else None, "variant": args.variant,
        **asdict(config),
    }  # fmt: skip
    if args.output_json is not None:
        results.append_run(args.output_json, results.new_run("perplexity", "pagedllm", settings, asdict(result)))
    print(
        f"{llm.engine.model_name}: perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens "
        f"({context}, dtype {config.dtype}, quantization {config.quantization}, kv {config.kv_cache_dtype}) "
        f"in {result.seconds:.1f}s, peak {result.peak_kv_blocks} KV blocks of {config.block_size} tokens"
    )
    return 0


def _context(config: EngineConfig, args: argparse.Namespace, corpus: str) -> str:
    """How much context each scored token had, in words."""
    if config.kv_cache_policy == "streaming":
        return f"streaming: {config.attention_sinks} sinks + window {config.kv_window}, token by token"
    if config.kv_cache_policy == "h2o":
        return f"h2o: budget {config.kv_budget}, token by token"
    if corpus == "sharegpt-long-replies":
        return "full: each record whole"
    return f"window {args.window}, stride {args.stride}"
