"""The grammar backend: constraints compile once and are cached; matchers walk and mask as the grammar says."""

from __future__ import annotations

import pytest

from pagedllm.errors import InvalidArgumentError
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.structured_output.backend import GrammarBackend
from pagedllm.structured_output.params import StructuredOutputsParams


@pytest.fixture(scope="module")
def backend() -> GrammarBackend:
    tokenizer = Tokenizer.from_model_path(resolve_model_path(None))
    return GrammarBackend(tokenizer, tokenizer.vocab_size)


def test_a_constraint_compiles_once(backend: GrammarBackend) -> None:
    first = backend.compile(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    again = backend.compile(StructuredOutputsParams(json={"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert first is again
    assert backend.new_matcher(StructuredOutputsParams(choice=("x",))) is not backend.new_matcher(
        StructuredOutputsParams(choice=("x",))
    )


def test_a_choice_matcher_accepts_only_its_choices(backend: GrammarBackend) -> None:
    tokenizer = backend.tokenizer
    matcher = backend.new_matcher(StructuredOutputsParams(choice=("yes", 'say "no"')))
    assert matcher.consume_tokens(tokenizer.encode('say "no"', add_special_tokens=False))
    assert matcher.is_stopped()
    other = backend.new_matcher(StructuredOutputsParams(choice=("yes", 'say "no"')))
    assert not other.try_consume_tokens(tokenizer.encode("maybe", add_special_tokens=False))


@pytest.mark.parametrize(
    ("params", "says"),
    [
        (StructuredOutputsParams(regex="(a)\\1"), "backreferences"),
        (StructuredOutputsParams(json={"type": "strin"}), "strin"),
        (StructuredOutputsParams(json="{not json"), "not valid JSON"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "undefined_rule"),
    ],
)
def test_what_cannot_compile_is_refused_by_name(backend: GrammarBackend, params, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        backend.compile(params)


@pytest.mark.parametrize(
    "fields", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"unknown": 1}, {"json_object": False}]
)
def test_structured_outputs_needs_exactly_one_known_field(fields: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        StructuredOutputsParams.from_dict(fields)
