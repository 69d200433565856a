"""Tokenizer, sandboxed chat-template rendering and incremental (streaming-safe) detokenization."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pagedllm.errors import InvalidArgumentError, RequestTooLongError

logger = logging.getLogger(__name__)

# Detokenizing a window of this many tokens before the new ones gives the spacing the new ones need.
DETOKENIZE_CONTEXT_TOKENS = 5
CHAT_ROLES = ("system", "user", "assistant", "tool")


def cache_dir() -> Path:
    root = os.environ.get("PAGEDLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pagedllm"
    )
    return Path(root)


def tokenizer_cache_folder(gguf_path: Path) -> Path:
    """Where the tokenizer converted from a GGUF file is kept (a new one for a changed file)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / key


def load_cached_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved by `from_model_path`, read by the `tokenizers` library from its tokenizer.json alone.

    A model-specific class (GemmaTokenizer) would rebuild it from Python copies of the vocabulary and merges and
    keep them for the life of the process; the saved file already holds the whole pipeline, so the plain
    backend gives the same ids and text.
    """
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


class Tokenizer:
    """Text ↔ token ids and chat prompts for one model."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        self.chat_template: str | None = (
            hf_tokenizer.chat_template if isinstance(hf_tokenizer.chat_template, str) else None
        )
        eos = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.special_ids: frozenset[int] = frozenset(hf_tokenizer.all_special_ids)
        self._template_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template_env.globals.update(raise_exception=_raise_template_error, strftime_now=_strftime_now)

    @classmethod
    def from_model_path(cls, path: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        """Load from an HF folder, or from a GGUF file's metadata (converted once, then cached on disk)."""
        if path.is_dir():
            return cls(AutoTokenizer.from_pretrained(str(path)), eos_token_ids)
        cached = tokenizer_cache_folder(path)
        if (cached / "tokenizer_config.json").is_file():
            return cls(load_cached_tokenizer(cached), eos_token_ids)
        logger.info("Converting the tokenizer of %s (once; cached in %s)", path.name, cached)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        try:
            hf_tokenizer.save_pretrained(str(cached))
        except OSError as error:
            logger.warning("Could not cache the tokenizer in %s: %s", cached, error)
            return cls(hf_tokenizer, eos_token_ids)
        del hf_tokenizer  # the conversion's Python lists of the vocabulary go with it
        return cls(load_cached_tokenizer(cached), eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` variable itself."""
        return self.chat_template is not None and "tools" in self.chat_template

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text of c characters the tokenizer keeps (control characters
        it may drop) has at least c / this tokens."""
        # A byte-level or sentencepiece token's string has one character per byte or character it encodes.
        tokens = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
        return max((len(token or "") for token in tokens), default=1)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        max_chars: int | None = None,
    ) -> str:
        """The prompt text of a conversation, from the model's chat template in a sandbox; rendering stops with
        RequestTooLongError once the text passes `max_chars`."""
        if not messages:
            raise InvalidArgumentError("messages must not be empty", "messages")
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise InvalidArgumentError(
                    f"each message needs a role in {CHAT_ROLES} and string content, got {message!r:.200}", "messages"
                )
        if self.chat_template is None:
            raise InvalidArgumentError("this model has no chat template; use a plain completion instead", "messages")
        try:
            template = self._template_env.from_string(self.chat_template)
            pieces = template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.hf.bos_token or "",
                eos_token=self.hf.eos_token or "",
            )
            return _join_at_most(pieces, max_chars)
        except TemplateError as error:
            raise InvalidArgumentError(f"chat template failed: {error}", "messages") from error

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        max_chars: int | None = None,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools, max_chars)
        return self.encode(text, add_special_tokens=False)


def _join_at_most(pieces: Iterator[str], max_chars: int | None) -> str:
    """The pieces joined, raising RequestTooLongError as soon as they pass `max_chars`."""
    text: list[str] = []
    length = 0
    for piece in pieces:
        text.append(piece)
        length += len(piece)
        if max_chars is not None and length > max_chars:
            raise RequestTooLongError(
                f"the conversation renders to more than {max_chars} characters, more than the context can hold",
                "messages",
            )
    return "".join(text)


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_ids[-DETOKENIZE_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def push(self, token_ids: list[int]) -> str:
        """Add new tokens; return the text they complete (may be empty while a character is incomplete)."""
        self.tokens.extend(token_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.tokens[self.prefix_offset :], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full_text[len(prefix_text) :]
