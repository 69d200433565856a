"""Fixed token corpora from the shipped ShareGPT file: held-out replies to evaluate (as a stream, or each after its
prompt), prompts to calibrate on.

The two read disjoint ranges of records, so a quantizer calibrated here is never scored on its own text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from pagedllm.benchmarks.datasets import TextTokenizer, iter_json_array_records, sharegpt_path
from pagedllm.errors import InvalidArgumentError

CALIBRATION_RECORDS = range(0, 4000)
EVALUATION_RECORDS = range(4000, 12000)
# Turns are joined with a paragraph break, as documents in a corpus are.
TURN_SEPARATOR = "\n\n"


def sharegpt_turns(path: Path, speaker: str | None, records: range) -> Iterator[str]:
    """The non-empty turns of `speaker` ('human' or 'gpt'; None: both) in the records `records` of a ShareGPT file."""
    for record in islice(iter_json_array_records(path), records.start, records.stop):
        for turn in record.get("conversations") or []:
            text = turn.get("value")
            if speaker in (None, turn.get("from")) and isinstance(text, str) and text.strip():
                yield text


def token_stream(texts: Iterator[str], tokenizer: TextTokenizer, num_tokens: int) -> list[int]:
    """The first `num_tokens` token ids of the texts joined by paragraph breaks (fewer if the texts run out)."""
    ids: list[int] = []
    for text in texts:
        if len(ids) >= num_tokens:
            break
        ids += tokenizer.encode(text + TURN_SEPARATOR, add_special_tokens=False)
    return ids[:num_tokens]


def evaluation_tokens(tokenizer: TextTokenizer, num_tokens: int) -> list[int]:
    """Held-out ShareGPT replies ('gpt' turns of EVALUATION_RECORDS), `num_tokens` long."""
    with sharegpt_path() as path:
        ids = token_stream(sharegpt_turns(path, "gpt", EVALUATION_RECORDS), tokenizer, num_tokens)
    _require_length(ids, num_tokens, "evaluation")
    return ids


def conversation_tokens(tokenizer: TextTokenizer, num_tokens: int) -> list[int]:
    """Held-out ShareGPT conversations (both sides' turns of EVALUATION_RECORDS) one after another, `num_tokens`
    long: a long stream for the streaming KV-cache policy."""
    with sharegpt_path() as path:
        ids = token_stream(sharegpt_turns(path, None, EVALUATION_RECORDS), tokenizer, num_tokens)
    _require_length(ids, num_tokens, "evaluation")
    return ids


def calibration_tokens(tokenizer: TextTokenizer, num_tokens: int) -> list[int]:
    """ShareGPT conversations (both sides' turns of CALIBRATION_RECORDS), `num_tokens` long."""
    with sharegpt_path() as path:
        ids = token_stream(sharegpt_turns(path, None, CALIBRATION_RECORDS), tokenizer, num_tokens)
    _require_length(ids, num_tokens, "calibration")
    return ids


@dataclass(frozen=True)
class PromptReply:
    """A prompt and its reply, cut together to a length: only the reply's tokens are scored."""

    token_ids: list[int]
    prompt_len: int


def sharegpt_exchanges(path: Path, records: range) -> Iterator[tuple[str, str]]:
    """Each human turn with the reply that follows it, in the records `records` of a ShareGPT file."""
    for record in islice(iter_json_array_records(path), records.start, records.stop):
        turns = [turn for turn in record.get("conversations") or [] if isinstance(turn.get("value"), str)]
        for asked, answered in zip(turns, turns[1:]):
            if asked.get("from") == "human" and answered.get("from") == "gpt" and asked["value"].strip():
                yield asked["value"], answered["value"]


def long_reply_records(tokenizer: TextTokenizer, num_records: int, record_tokens: int) -> list[PromptReply]:
    """The first `num_records` held-out exchanges (EVALUATION_RECORDS) whose prompt takes at most a quarter of
    `record_tokens` and whose reply fills the rest, each cut to `record_tokens` tokens: long answers to score."""
    chosen: list[PromptReply] = []
    with sharegpt_path() as path:
        for prompt, reply in sharegpt_exchanges(path, EVALUATION_RECORDS):
            if len(chosen) == num_records:
                break
            if len(reply) < 2 * record_tokens:  # too short in any tokenizer that merges a few characters a token
                continue
            prompt_ids = tokenizer.encode(prompt + TURN_SEPARATOR, add_special_tokens=False)
            if len(prompt_ids) > record_tokens // 4:
                continue
            reply_ids = tokenizer.encode(reply, add_special_tokens=False)
            if len(prompt_ids) + len(reply_ids) >= record_tokens:
                chosen.append(PromptReply((prompt_ids + reply_ids)[:record_tokens], len(prompt_ids)))
    if len(chosen) < num_records:
        raise InvalidArgumentError(
            f"the ShareGPT evaluation records hold only {len(chosen)} exchanges with a {record_tokens}-token reply",
            "num_records",
        )
    return chosen


def _require_length(ids: list[int], wanted: int, kind: str) -> None:
    if len(ids) < wanted:
        raise InvalidArgumentError(f"the ShareGPT {kind} records hold only {len(ids)} tokens; asked for {wanted}")
