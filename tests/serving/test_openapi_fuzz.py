"""Schemathesis against the server's own OpenAPI schema, and Hypothesis beyond it (lone surrogates, any Unicode,
huge numbers, NaN): whatever it sends, the server never answers 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from .conftest import Server

MAX_EXAMPLES = 15
MAX_TOKENS = 3
MAX_N = 2
GET_OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/tokenizer_info"),
    ("GET", "/metrics"),
]
POST_OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]
CASES = [
    *[(method, path, GenerationMode.POSITIVE) for method, path in GET_OPERATIONS + POST_OPERATIONS],
    *[(method, path, GenerationMode.NEGATIVE) for method, path in POST_OPERATIONS],
]


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def keep_it_cheap(body: Any) -> None:
    """Bound the work a generated body asks for, so the run takes seconds: few tokens, few samples."""
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # a chat without max_tokens may use the rest of the context
    if "input" in body and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = MAX_TOKENS  # likewise a response
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > MAX_N:
        body["n"] = MAX_N


def test_the_schema_has_every_operation_fuzzed_here(api_schema: Any) -> None:
    operations = {(result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()}
    assert operations == set(GET_OPERATIONS + POST_OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_input_makes_the_server_fail(
    api_schema: Any, server: Server, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )
    def fuzz(case: Any) -> None:
        keep_it_cheap(case.body)
        case.call_and_validate(base_url=server.base_url, headers=server.auth, checks=[not_a_server_error], timeout=60)

    fuzz()


# Beyond the schema: text with lone surrogates and any Unicode, numbers far outside every range, NaN and infinity.
SURROGATES = st.characters(categories=["Cs"])
TEXT = st.one_of(
    st.text(max_size=20),
    st.builds(
        lambda head, surrogate, tail: head + surrogate + tail, st.text(max_size=8), SURROGATES, st.text(max_size=8)
    ),
)
NUMBER = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from([1e308, -1e308, 2**62, 2**63, 2**64, 10**30, -1, 0, 1e-300]),
)
SAMPLING = {
    name: NUMBER
    for name in (
        "max_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_tokens",
    )
} | {"stop": st.one_of(TEXT, st.lists(TEXT, max_size=2)), "stream": st.booleans()}
COMPLETION_BODIES = st.fixed_dictionaries(
    {"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3))}, optional={**SAMPLING, "logprobs": NUMBER}
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), TEXT),
        "content": st.one_of(
            TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
        ),
    }
)
CHAT_BODIES = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={**SAMPLING, "logprobs": st.booleans(), "top_logprobs": NUMBER},
)


def cheap_numbers(body: dict[str, Any]) -> dict[str, Any]:
    """Keep valid but costly values small; values beyond any limit stay, for the server to refuse."""
    for name, cheap in (("max_tokens", MAX_TOKENS), ("n", MAX_N), ("min_tokens", 0)):
        value = body.get(name)
        if isinstance(value, int) and cheap < value <= 10**6:
            body[name] = cheap
    body.setdefault("max_tokens", MAX_TOKENS)
    return body


@pytest.mark.parametrize(
    ("path", "bodies"), [("/v1/completions", COMPLETION_BODIES), ("/v1/chat/completions", CHAT_BODIES)]
)
def test_random_unicode_and_huge_numbers_never_make_the_server_fail(server: Server, path: str, bodies: Any) -> None:
    @given(body=bodies)
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def fuzz(body: dict[str, Any]) -> None:
        content = json.dumps(cheap_numbers(body)).encode()  # ASCII: surrogates escaped, NaN and Infinity as is
        headers = {**server.auth, "Content-Type": "application/json"}
        response = httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=60)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    fuzz()
