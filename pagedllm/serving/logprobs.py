"""Per-token log probabilities in OpenAI's two shapes: the completions object and chat's `content` list."""

from __future__ import annotations

import math
import re
from functools import lru_cache

from pagedllm.model.tokenizer import Tokenizer
from pagedllm.serving.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

# OpenAI reports this for tokens too unlikely to have a finite log probability; JSON has no -Infinity.
MIN_LOGPROB = -9999.0
BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SENTENCEPIECE_SPACE = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in chars.items()}


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


class TokenStrings:
    """A token id's text and raw UTF-8 bytes, as logprobs report them (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bytes = lru_cache(maxsize=65536)(self._bytes)
        self.text = lru_cache(maxsize=65536)(self._text)

    def _bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.hf.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return []
        if match := BYTE_TOKEN.match(piece):
            return [int(match.group(1), 16)]
        if all(char in BYTE_LEVEL_ALPHABET for char in piece) and token_id not in self.tokenizer.special_ids:
            return [BYTE_LEVEL_ALPHABET[char] for char in piece]
        return list(piece.replace(SENTENCEPIECE_SPACE, " ").encode())

    def _text(self, token_id: int) -> str:
        return bytes(self.bytes(token_id)).decode("utf-8", errors="replace")


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > MIN_LOGPROB else MIN_LOGPROB


def _ranked(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])


def completion_logprobs(
    strings: TokenStrings, token_ids: list[int], logprobs: list[dict[int, float]], text_offset: int
) -> CompletionLogprobs:
    """The completions `logprobs` object for these tokens; offsets count from `text_offset`."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs):
        text = strings.text(token_id)
        result.tokens.append(text)
        result.token_logprobs.append(finite(entry[token_id]))
        result.top_logprobs.append({strings.text(t): finite(lp) for t, lp in _ranked(entry)})
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


def prompt_completion_logprobs(
    strings: TokenStrings, token_ids: list[int], prompt_logprobs: list[dict[int, float] | None]
) -> CompletionLogprobs:
    """An echoed prompt's `logprobs` object: the first token has no context, so its entries are null."""
    result = CompletionLogprobs()
    offset = 0
    for token_id, entry in zip(token_ids, prompt_logprobs):
        text = strings.text(token_id)
        result.tokens.append(text)
        result.token_logprobs.append(None if entry is None else finite(entry[token_id]))
        result.top_logprobs.append(None if entry is None else {strings.text(t): finite(lp) for t, lp in _ranked(entry)})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(
    strings: TokenStrings, token_ids: list[int], logprobs: list[dict[int, float]], num_top: int
) -> ChatLogprobs:
    """Chat's `logprobs.content` for these tokens, each with its `num_top` most likely alternatives."""
    content = [
        ChatTokenLogprob(
            token=strings.text(token_id),
            logprob=finite(entry[token_id]),
            bytes=strings.bytes(token_id),
            top_logprobs=[
                TopLogprob(token=strings.text(t), logprob=finite(lp), bytes=strings.bytes(t))
                for t, lp in _ranked(entry)[:num_top]
            ],
        )
        for token_id, entry in zip(token_ids, logprobs)
    ]
    return ChatLogprobs(content=content)
