"""The grammar library behind constrained decoding (llguidance): compiles a request's constraint once per distinct
constraint and hands out matchers that start from the compiled state."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from pagedllm.errors import InvalidArgumentError
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.structured_output.params import StructuredOutputsParams

COMPILE_CACHE_SIZE = 256
# Compact JSON as json.dumps(separators=(", ", ": ")) writes it: free whitespace lets a small model pad forever.
JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarBackend:
    """Compiles constraints against one tokenizer; compiled matchers are cached by the constraint's key."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The library's view of the vocabulary, built on first use (it takes about half a second)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer.hf, n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.eos_token_ids)
                )
            return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled start state of `params`; raises InvalidArgumentError naming what the library refused."""
        key = params.key
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar_text(params), log_level=0)
        if matcher.is_error():
            raise InvalidArgumentError(
                f"structured output {params.kind} cannot be compiled: {matcher.get_error()}", params.kind
            )
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > COMPILE_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def new_matcher(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A matcher of its own for one sequence, at the start of the grammar."""
        return self.compile(params).deep_copy()


def grammar_text(params: StructuredOutputsParams) -> str:
    """The constraint in the library's grammar format."""
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise InvalidArgumentError(f"the JSON schema is not valid JSON: {error}", "json") from error
        if not isinstance(schema, dict):
            raise InvalidArgumentError("the JSON schema must be an object", "json")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if params.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, overrides=JSON_OPTIONS)
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    assert params.grammar is not None
    try:
        lark = any_to_lark(params.grammar)  # GBNF is converted, Lark passes through
    except GbnfToLarkError as error:
        raise InvalidArgumentError(f"the grammar cannot be read: {error}", "grammar") from error
    return llguidance.LLMatcher.grammar_from_lark(lark)
