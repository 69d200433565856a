"""Schemathesis against the server's own OpenAPI schema: whatever it sends, the server never answers 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from .conftest import Server

MAX_EXAMPLES = 15
MAX_TOKENS = 3
MAX_N = 2
GET_OPERATIONS = [("GET", "/health"), ("GET", "/version"), ("GET", "/v1/models"), ("GET", "/metrics")]
POST_OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
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
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS  # a chat without max_tokens may use the rest of the context
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
