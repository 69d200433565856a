"""`bench structured`: its chat requests against a scripted server, the long schemas it asks for, and its report
section."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

from pagedllm.benchmarks import results
from pagedllm.benchmarks.metrics import RequestTrace, summarize
from pagedllm.benchmarks.report import markdown_report
from pagedllm.benchmarks.serve import BACKENDS, LoadSettings, run_load
from pagedllm.benchmarks.structured import (
    JSON_SCHEMA,
    KINDS,
    TOOL_CHOICE_REQUIRED,
    bench_requests,
    chat_sender,
    kind_fields,
    long_schema,
)
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.structured_output.backend import GrammarBackend
from pagedllm.structured_output.params import StructuredOutputsParams
from pagedllm.structured_output.schema_table import SCHEMAS

SETTINGS = LoadSettings("http://scripted", "m", BACKENDS["pagedllm"], math.inf, 2, 0, 60.0)


class ScriptedChatServer:
    """Streams a role chunk, then one chunk per token as pagedllm's chat stream does: empty content while a call's
    name is held back, then the call; records the payloads."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        self.payloads.append(payload)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.events(payload))

    async def events(self, payload: dict) -> AsyncIterator[bytes]:
        def chunk(delta: dict, **fields: object) -> bytes:
            return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}], **fields})}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        for index in range(payload["max_tokens"]):
            await asyncio.sleep(0)
            if "tools" in payload and index > 2:
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": "x"}}]})
            else:
                yield chunk({"content": "" if "tools" in payload else "t"})
        usage = {"prompt_tokens": 7, "completion_tokens": payload["max_tokens"], "total_tokens": 0}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"


@pytest.mark.parametrize("kind", KINDS)
def test_every_chunk_after_the_role_counts_as_a_token(kind: str) -> None:
    server = ScriptedChatServer()
    send = chat_sender(SETTINGS, kind_fields(kind, 6))
    result = asyncio.run(
        run_load(bench_requests(4, 6), SETTINGS, transport=httpx.MockTransport(server.handle), send=send)
    )
    traces: list[RequestTrace] = result.traces
    assert all(trace.error is None and len(trace.chunk_times) == 6 == trace.output_tokens for trace in traces)
    assert all(trace.prompt_len == 7 for trace in traces)
    assert summarize(traces, result.duration_s).tpot_ms.median > 0
    payload = server.payloads[-1]
    assert payload["ignore_eos"] and payload["max_tokens"] == 6 and payload["stream"]
    assert ("tools" in payload) == (kind == TOOL_CHOICE_REQUIRED)
    assert ("response_format" in payload) == (kind == JSON_SCHEMA)


def test_json_requests_cycle_through_the_table_as_long_arrays() -> None:
    fields = kind_fields(JSON_SCHEMA, 64)
    schemas = [next(fields)["response_format"]["json_schema"]["schema"] for _ in range(len(SCHEMAS) + 1)]
    assert [schema["minItems"] for schema in schemas] == [64] * (len(SCHEMAS) + 1)
    assert [schema["items"] for schema in schemas[:2]] == list(SCHEMAS.values())[:2]
    assert schemas[-1] == schemas[0]


def test_long_schemas_compile_and_cannot_end_early() -> None:
    tokenizer = Tokenizer.from_model_path(resolve_model_path(None))
    backend = GrammarBackend(tokenizer, tokenizer.vocab_size)
    for schema in SCHEMAS.values():  # references into $defs still resolve from the array's root
        backend.compile(StructuredOutputsParams(json=long_schema(schema, 64)))
    one_item = tokenizer.encode('[{"ok": true}]', add_special_tokens=False)
    for min_items, accepted in ((1, True), (2, False)):  # with two, the closing bracket is refused
        matcher = backend.new_matcher(StructuredOutputsParams(json=long_schema(SCHEMAS["boolean field"], min_items)))
        assert (matcher.try_consume_tokens(one_item) == len(one_item)) == accepted


def test_report_shows_tpot_against_free_generation_and_compile_times(tmp_path: Path) -> None:
    def point(kind: str, tpot: float) -> dict:
        metrics = summarize([], 1.0)
        tpot_ms = {**asdict(metrics.tpot_ms), "median": tpot, "p99": tpot * 2}
        return {"kind": kind, "concurrency": 16, "metrics": {**asdict(metrics), "tpot_ms": tpot_ms}}

    record = {
        "points": [point("free", 20.0), point(JSON_SCHEMA, 21.0), point(TOOL_CHOICE_REQUIRED, 23.0)],
        "compile": {"num_schemas": 27, "rounds": 5, "p50_ms": 0.6, "p99_ms": 2.5, "max_ms": 3.0},
    }
    path = tmp_path / "r.json"
    results.append_run(path, results.new_run("structured", "pagedllm", {"num_prompts": 32, "output_len": 64}, record))
    text = markdown_report(results.load_results(path))
    assert "| 16 | json_schema | 21.0 | 42.0 | 0.0 | 1.05× | 0 |" in text
    assert "| 16 | tool_choice required | 23.0 | 46.0 | 0.0 | 1.15× | 0 |" in text
    assert "p50 0.60 ms, p99 2.50 ms" in text
