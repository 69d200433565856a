"""`pagedllm bench structured`: the cost of constrained decoding through the server: time per output token with a
JSON schema and with `tool_choice: required` against free generation, and schema compile times over the schema
table.

Every request streams a chat completion with `ignore_eos`, and each JSON schema is the table's schema repeated as
an array at least as long as the output, so all three kinds run to the same `--output-len` tokens: their TPOTs
differ by the grammar's work alone (the mask computed before each token, the matcher advanced after it).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from pagedllm.benchmarks import results
from pagedllm.benchmarks.datasets import BenchmarkRequest
from pagedllm.benchmarks.metrics import PERCENTILES, RequestTrace, summarize
from pagedllm.benchmarks.serve import (
    BACKENDS,
    LoadSettings,
    Send,
    pagedllm_server,
    parse_concurrencies,
    run_load,
    served_model_name,
    stream_into,
)
from pagedllm.benchmarks.server_process import free_port
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.structured_output.backend import GrammarBackend
from pagedllm.structured_output.params import StructuredOutputsParams
from pagedllm.structured_output.schema_table import SCHEMAS

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
CITIES = ("Paris", "Lagos", "Lima", "Osaka", "Oslo", "Perth", "Quito", "Dakar")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
FREE = "free"
JSON_SCHEMA = "json_schema"
TOOL_CHOICE_REQUIRED = "tool_choice required"
KINDS = (FREE, JSON_SCHEMA, TOOL_CHOICE_REQUIRED)


def long_schema(item: dict[str, Any], min_items: int) -> dict[str, Any]:
    """An array of at least `min_items` instances of `item` (each at least one token): the output never completes
    before max_tokens. The item's $defs move to the root, where its references point."""
    item = dict(item)
    defs = item.pop("$defs", None)
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": min_items}
    if defs is not None:
        schema["$defs"] = defs
    return schema


def kind_fields(kind: str, output_len: int) -> Iterator[dict[str, Any]]:
    """The request fields of each successive request of one kind; JSON schemas cycle through the table."""
    if kind == JSON_SCHEMA:
        for schema in itertools.cycle(SCHEMAS.values()):
            spec = {"name": "items", "schema": long_schema(schema, output_len)}
            yield {"response_format": {"type": "json_schema", "json_schema": spec}}
    while True:
        yield {"tools": TOOLS, "tool_choice": "required"} if kind == TOOL_CHOICE_REQUIRED else {}


def record_chat_event(trace: RequestTrace, event: dict[str, Any], arrived_at: float) -> None:
    """Fold one chat chunk into the trace. Every chunk after the role's carries the tokens of one engine step, text
    or not (a tool call's name is held back until it is whole), so each counts as a token's arrival."""
    if "error" in event:
        trace.error = json.dumps(event["error"])
        return
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("role") is None:
            trace.chunk_times.append(arrived_at)
            trace.generated_text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                trace.generated_text += call["function"].get("arguments", "")
    usage = event.get("usage")
    if usage:
        trace.prompt_len = int(usage["prompt_tokens"])
        trace.usage_output_tokens = int(usage["completion_tokens"])


def chat_sender(settings: LoadSettings, fields: Iterator[dict[str, Any]]) -> Send:
    """Sends a request's prompt as a streamed chat completion with the next of `fields`, timing every chunk."""

    async def send(client: httpx.AsyncClient, request: BenchmarkRequest) -> RequestTrace:
        trace = RequestTrace(prompt_len=0, expected_output_len=request.output_len)
        payload = {
            "model": settings.model,
            "messages": [{"role": "user", "content": request.prompt}],
            "max_tokens": request.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            **next(fields),
        }
        await stream_into(client, settings.base_url.rstrip("/") + CHAT_PATH, payload, trace, record_chat_event)
        if trace.error is None and not trace.chunk_times:
            trace.error = "the stream carried no tokens"
        return trace

    return send


def bench_requests(num_prompts: int, output_len: int) -> list[BenchmarkRequest]:
    """The same questions for every kind (a tool call or a JSON answer fits each)."""
    return [
        BenchmarkRequest(f"What is the weather and the time in {CITIES[index % len(CITIES)]}?", 0, output_len)
        for index in range(num_prompts)
    ]


@dataclass(frozen=True)
class CompileTimes:
    """Compile times of every schema of the table, each compiled afresh in every round."""

    num_schemas: int
    rounds: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def compile_times(model: str | None, rounds: int) -> CompileTimes:
    tokenizer = Tokenizer.from_model_path(resolve_model_path(model))
    seconds = []
    for _ in tqdm(range(rounds), desc="schema compile rounds", unit="round"):
        backend = GrammarBackend(tokenizer, tokenizer.vocab_size)  # a fresh compile cache
        _ = backend.ll_tokenizer  # the vocabulary is built once per backend, not per schema: not timed
        for schema in SCHEMAS.values():
            started = time.perf_counter()
            backend.compile(StructuredOutputsParams(json=schema))
            seconds.append(time.perf_counter() - started)
    ms = np.asarray(seconds) * 1000.0
    p50, _, p99 = np.percentile(ms, PERCENTILES)
    return CompileTimes(len(SCHEMAS), rounds, float(p50), float(p99), float(ms.max()))


def load_kind(kind: str, base_url: str, concurrency: int, args: argparse.Namespace, server_pid: int | None) -> dict:
    """One kind of request at one concurrency: its serving metrics."""
    settings = LoadSettings(
        base_url=base_url,
        model=args.served_model_name or served_model_name(base_url),
        backend=BACKENDS["pagedllm"],
        request_rate=math.inf,
        max_concurrency=concurrency,
        seed=args.seed,
        request_timeout_s=args.request_timeout,
    )
    send = chat_sender(settings, kind_fields(kind, args.output_len))
    requests = bench_requests(args.num_prompts, args.output_len)
    result = asyncio.run(run_load(requests, settings, server_pid, send=send))
    failed = [trace.error for trace in result.traces if trace.error]
    if failed:
        logger.warning("%s: %d requests failed; the first: %s", kind, len(failed), failed[0])
    return {"kind": kind, "concurrency": concurrency, "metrics": asdict(summarize(result.traces, result.duration_s))}


def format_points(points: list[dict[str, Any]], compiles: CompileTimes) -> str:
    lines = []
    for point in points:
        free = next(p for p in points if p["concurrency"] == point["concurrency"] and p["kind"] == FREE)
        tpot, free_tpot = point["metrics"]["tpot_ms"]["median"], free["metrics"]["tpot_ms"]["median"]
        lines.append(
            f"concurrency {point['concurrency']:>3}  {point['kind']:<22} TPOT p50 {tpot:8.2f} ms"
            f"  ({tpot / free_tpot - 1:+.1%} against free)  failed {point['metrics']['failed']}"
        )
    lines.append(
        f"schema compile ({compiles.num_schemas} schemas x {compiles.rounds} rounds): p50 {compiles.p50_ms:.2f} ms, "
        f"p99 {compiles.p99_ms:.2f} ms, max {compiles.max_ms:.2f} ms"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="a running pagedllm server (default: launch one per concurrency)")
    parser.add_argument("--model", default=None, help="the model to serve and whose tokenizer compiles the schemas")
    parser.add_argument("--served-model-name", default=None, help="model name to request (default: the first)")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests of each kind at each concurrency")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens of every request")
    parser.add_argument(
        "--max-concurrency", type=parse_concurrencies, default=[1, 16], help="comma list of concurrencies"
    )
    parser.add_argument("--max-model-len", type=int, default=2048, help="launched servers' context length")
    parser.add_argument("--compile-rounds", type=int, default=5, help="times every schema of the table is compiled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=3600.0, help="seconds one request may take")
    results.add_output_argument(parser)


def run(args: argparse.Namespace) -> int:
    output = args.output_json or results.default_results_path()
    compiles = compile_times(args.model, args.compile_rounds)
    points = []
    server_command = None
    for concurrency in args.max_concurrency:
        width = concurrency or args.num_prompts
        launched = pagedllm_server(args.model, free_port(), width, args.max_model_len) if not args.base_url else None
        with launched or nullcontext() as server:
            base_url = server.base_url if server else args.base_url
            server_command = server.command if server else None
            for kind in KINDS:
                points.append(load_kind(kind, base_url, width, args, server.pid if server else None))
    print(format_points(points, compiles))
    settings = {
        "model": args.model,
        "base_url": args.base_url,
        "num_prompts": args.num_prompts,
        "output_len": args.output_len,
        "max_concurrency": [concurrency or args.num_prompts for concurrency in args.max_concurrency],
        "seed": args.seed,
        "server_command": server_command,
    }
    record = {"points": points, "compile": asdict(compiles)}
    results.append_run(output, results.new_run("structured", "pagedllm", settings, record))
    print(f"results appended to {output}")
    return 0
