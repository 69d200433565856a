"""`pagedllm bench serve`: an asyncio load generator for any OpenAI-compatible /v1/completions server.

Requests arrive as a Poisson process at `--request-rate` (or all at once with `inf`), at most
`--max-concurrency` in flight; every response is streamed and timed on the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm

from pagedllm.benchmarks import datasets, peers, results
from pagedllm.benchmarks.datasets import BenchmarkRequest
from pagedllm.benchmarks.memory import PeakMemoryMonitor
from pagedllm.benchmarks.metrics import RequestTrace, ServingMetrics, summarize
from pagedllm.benchmarks.server_process import ServerProcess, free_port
from pagedllm.model.registry import resolve_model_path
from pagedllm.serving.metrics import KV_CACHE_BYTES, WEIGHT_BYTES

logger = logging.getLogger(__name__)

COMPLETIONS_PATH = "/v1/completions"
SSE_DATA_PREFIX = "data:"
SSE_DONE = "[DONE]"
PROBE_PROMPT = "Hello"
PROBE_MAX_TOKENS = 4
LAUNCHABLE = ("pagedllm", "llama.cpp")


@dataclass(frozen=True)
class Backend:
    """A kind of server, and which non-standard request fields it accepts."""

    name: str
    supports_ignore_eos: bool


BACKENDS: dict[str, Backend] = {
    "openai": Backend("openai", supports_ignore_eos=False),
    "pagedllm": Backend("pagedllm", supports_ignore_eos=True),
    "llama.cpp": Backend("llama.cpp", supports_ignore_eos=True),
}


@dataclass(frozen=True)
class LoadSettings:
    base_url: str
    model: str
    backend: Backend
    request_rate: float
    max_concurrency: int | None
    seed: int
    request_timeout_s: float


@dataclass(frozen=True)
class LoadResult:
    traces: list[RequestTrace]
    duration_s: float
    peak_rss_bytes: int | None


def arrival_delays(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Gaps between request arrivals: exponential with mean 1/rate (a Poisson process), or zero at rate inf."""
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    return [rng.expovariate(request_rate) for _ in range(num_requests)]


def completion_payload(
    request: BenchmarkRequest, settings: LoadSettings, max_tokens: int | None = None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": settings.model,
        "prompt": request.prompt,
        "max_tokens": max_tokens or request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.backend.supports_ignore_eos:
        payload["ignore_eos"] = True
    return payload


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON of one `data:` line of a server-sent event stream; None for other lines and `[DONE]`."""
    if not line.startswith(SSE_DATA_PREFIX):
        return None
    data = line[len(SSE_DATA_PREFIX) :].strip()
    if data == SSE_DONE:
        return None
    return json.loads(data)


def record_event(trace: RequestTrace, event: dict[str, Any], arrived_at: float) -> None:
    """Fold one streamed completion chunk into the trace."""
    if "error" in event:
        trace.error = json.dumps(event["error"])
        return
    choices = event.get("choices") or []
    text = choices[0].get("text") if choices else None
    if text:
        trace.chunk_times.append(arrived_at)
        trace.generated_text += text
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        trace.usage_output_tokens = int(usage["completion_tokens"])


async def stream_completion(
    client: httpx.AsyncClient, settings: LoadSettings, request: BenchmarkRequest, max_tokens: int | None = None
) -> RequestTrace:
    """Send one streamed completion request and time every chunk of its answer."""
    trace = RequestTrace(prompt_len=request.prompt_len, expected_output_len=max_tokens or request.output_len)
    payload = completion_payload(request, settings, max_tokens)
    url = settings.base_url.rstrip("/") + COMPLETIONS_PATH
    await stream_into(client, url, payload, trace, record_event)
    if trace.error is None and not trace.chunk_times:
        trace.error = "the stream carried no generated text"
    return trace


async def stream_into(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    trace: RequestTrace,
    record: Callable[[RequestTrace, dict[str, Any], float], None],
) -> None:
    """POST a streamed request and fold each server-sent event into `trace` as it arrives (with `record`); an
    HTTP error status or a broken stream becomes the trace's error."""
    trace.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = await response.aread()
                trace.error = f"HTTP {response.status_code}: {body.decode(errors='replace')[:500]}"
                return
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is not None:
                    record(trace, event, time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        trace.error = f"{type(error).__name__}: {error}"
    finally:
        trace.finished_at = time.perf_counter()


# Sends one request and times its streamed answer.
Send = Callable[[httpx.AsyncClient, BenchmarkRequest], Awaitable[RequestTrace]]


async def run_load(
    requests: list[BenchmarkRequest],
    settings: LoadSettings,
    server_pid: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    send: Send | None = None,
) -> LoadResult:
    """Send every request on its arrival schedule, under the concurrency cap; wait for all answers.

    `send` sends one request (default: a streamed completion); `transport` replaces the network (tests pass an
    in-process one).
    """

    async def completion(client: httpx.AsyncClient, request: BenchmarkRequest) -> RequestTrace:
        return await stream_completion(client, settings, request)

    send = send or completion
    # A fresh connection per request: a kept-alive one that the server has already closed (llama-server does so
    # now and then) would fail the next request in 1 ms, before it reaches the server.
    limits = httpx.Limits(max_connections=settings.max_concurrency, max_keepalive_connections=0)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=30.0)
    semaphore = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        probe = await send(client, BenchmarkRequest(PROBE_PROMPT, 1, PROBE_MAX_TOKENS))
        if probe.error is not None:
            raise RuntimeError(f"the probe request to {settings.base_url} failed: {probe.error}")
        progress = tqdm(
            total=len(requests), desc=f"requests (concurrency {settings.max_concurrency or 'inf'})", unit="req"
        )

        async def limited(request: BenchmarkRequest) -> RequestTrace:
            async with semaphore or nullcontext():
                trace = await send(client, request)
            progress.update(1)
            return trace

        monitor = PeakMemoryMonitor(server_pid) if server_pid is not None else None
        async with monitor or nullcontext():
            started = time.perf_counter()
            tasks = []
            for request, delay in zip(
                requests, arrival_delays(len(requests), settings.request_rate, settings.seed), strict=True
            ):
                if delay:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(request)))
            traces = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - started
        progress.close()
    return LoadResult(traces, duration, monitor.peak_bytes if monitor else None)


def served_model_name(base_url: str) -> str:
    """The first model the server lists at /v1/models."""
    response = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30.0)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def server_memory_budget(base_url: str) -> dict[str, int] | None:
    """The weight and KV-cache bytes a pagedllm server exports in /metrics; None for servers that do not."""
    try:
        response = httpx.get(base_url.rstrip("/") + "/metrics", timeout=30.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    wanted = {WEIGHT_BYTES: "weight_bytes", KV_CACHE_BYTES: "kv_cache_bytes"}
    budget = {
        wanted[family.name]: int(family.samples[0].value)
        for family in text_string_to_metric_families(response.text)
        if family.name in wanted and family.samples
    }
    return budget if len(budget) == len(wanted) else None


def format_metrics(
    engine: str,
    concurrency: int | None,
    metrics: ServingMetrics,
    peak_rss_bytes: int | None,
    memory_budget: dict[str, int] | None = None,
) -> str:
    lines = [
        f"==== {engine}, max concurrency {concurrency or 'inf'} ====",
        f"completed / failed          {metrics.completed} / {metrics.failed}",
        f"duration (s)                {metrics.duration_s:.2f}",
        f"input / output tokens       {metrics.total_input_tokens} / {metrics.total_output_tokens}",
        f"output chunks (client)      {metrics.total_output_chunks}",
        f"request throughput (req/s)  {metrics.request_throughput:.3f}",
        f"output throughput (tok/s)   {metrics.output_throughput:.2f}",
        f"total throughput (tok/s)    {metrics.total_token_throughput:.2f}",
    ]
    for name, dist in (
        ("TTFT", metrics.ttft_ms),
        ("TPOT", metrics.tpot_ms),
        ("ITL", metrics.itl_ms),
        ("E2E", metrics.e2e_latency_ms),
    ):
        lines.append(
            f"{name:<5} ms  mean {dist.mean:9.2f}  median {dist.median:9.2f}  p90 {dist.p90:9.2f}  p99 {dist.p99:9.2f}"
        )
    if peak_rss_bytes is not None:
        lines.append(f"server peak RSS (MiB)       {peak_rss_bytes / 2**20:.1f}")
    if peak_rss_bytes is not None and memory_budget is not None:
        weights, kv_cache = memory_budget["weight_bytes"], memory_budget["kv_cache_bytes"]
        lines.append(f"  weights / KV cache (MiB)  {weights / 2**20:.1f} / {kv_cache / 2**20:.1f}")
        lines.append(f"  RSS beyond both (MiB)     {(peak_rss_bytes - weights - kv_cache) / 2**20:.1f}")
    return "\n".join(lines)


def run_record(
    result: LoadResult, metrics: ServingMetrics, memory_budget: dict[str, int] | None = None
) -> dict[str, Any]:
    """What the results file keeps of a run: the metrics and a compact per-request log."""
    return {
        "metrics": asdict(metrics),
        "peak_rss_bytes": result.peak_rss_bytes,
        "memory_budget": memory_budget,
        "requests": [
            {
                "prompt_len": trace.prompt_len,
                "expected_output_len": trace.expected_output_len,
                "output_tokens": trace.output_tokens,
                "output_chunks": len(trace.chunk_times),
                "ttft_s": trace.ttft if trace.chunk_times else None,
                "latency_s": trace.latency,
                "error": trace.error,
            }
            for trace in result.traces
        ],
    }


@contextmanager
def launched_server(args: argparse.Namespace, concurrency: int) -> Iterator[ServerProcess]:
    """Start the engine named by --launch, sized for `concurrency` parallel requests of --max-model-len tokens."""
    port = free_port()
    if args.launch == "llama.cpp":
        server = peers.llama_server(
            resolve_model_path(args.model), port, concurrency, args.max_model_len, args.num_threads
        )
    else:
        server = pagedllm_server(args.model, port, concurrency, args.max_model_len)
    with server:
        yield server


def pagedllm_server(
    model: str | None, port: int, concurrency: int, max_model_len: int, engine_args: Sequence[str] = ()
) -> ServerProcess:
    """`pagedllm serve` on 127.0.0.1 sized for `concurrency` parallel requests, with more engine flags (not yet
    started)."""
    command = [
        sys.executable, "-m", "pagedllm.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(concurrency), "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    if model:
        command += ["--model", model]
    return ServerProcess([*command, *engine_args], port, "pagedllm")


def parse_concurrencies(text: str) -> list[int | None]:
    """'1,4,16' → [1, 4, 16]; 'inf' → [None] (no cap)."""
    values: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        values.append(None if item == "inf" else int(item))
        if values[-1] is not None and values[-1] < 1:
            raise argparse.ArgumentTypeError(f"concurrency must be >= 1 or inf, got {item}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    target.add_argument("--base-url", help="server to load, e.g. http://127.0.0.1:8000 (or use --launch)")
    target.add_argument(
        "--launch", choices=LAUNCHABLE, help="start this engine's server here for each concurrency, and stop it after"
    )
    target.add_argument("--model", default=None, help="--launch: the model to serve (default: the embedded model)")
    target.add_argument(
        "--num-threads", type=int, default=results.usable_cpu_count(), help="--launch llama.cpp: threads"
    )
    target.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=None,
        help="server kind: sets which extra fields (ignore_eos) are sent (default: --launch, else openai)",
    )
    target.add_argument(
        "--served-model-name", default=None, help="model name to request (default: the first at /v1/models)"
    )
    target.add_argument("--server-pid", type=int, default=None, help="record the peak resident memory of this process")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals; inf sends all at once",
    )
    load.add_argument(
        "--max-concurrency",
        type=parse_concurrencies,
        default=[None],
        help="cap on requests in flight; a comma list runs each in turn (e.g. 1,4,16)",
    )
    load.add_argument("--request-timeout", type=float, default=3600.0, help="seconds one request may take")
    parser.add_argument("--label", default=None, help="engine name in the results (default: --launch or --backend)")
    results.add_output_argument(parser)
    datasets.add_arguments(parser)


def settings_record(
    args: argparse.Namespace, settings: LoadSettings, server_command: list[str] | None
) -> dict[str, Any]:
    """The settings of a run as the results file keeps them (strict JSON: the infinite rate is 'inf')."""
    return {
        "base_url": settings.base_url,
        "backend": settings.backend.name,
        "model": settings.model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_model_len": args.max_model_len,
        "sharegpt_output_len": args.sharegpt_output_len,
        "request_rate": "inf" if math.isinf(settings.request_rate) else settings.request_rate,
        "max_concurrency": settings.max_concurrency,
        "seed": settings.seed,
        "launched": args.launch,
        "server_command": server_command,
    }


def run(args: argparse.Namespace) -> int:
    if (args.base_url is None) == (args.launch is None):
        print("give exactly one of --base-url and --launch", file=sys.stderr)
        return 2
    backend = BACKENDS[args.backend or args.launch or "openai"]
    engine = args.label or args.launch or backend.name
    requests = datasets.requests_from_args(args)
    output = args.output_json or results.default_results_path()
    versions = {"llama.cpp": peers.llama_cpp_version()} if args.launch == "llama.cpp" else None
    for concurrency in args.max_concurrency:
        with launched_server(args, concurrency or args.num_prompts) if args.launch else nullcontext() as server:
            base_url = server.base_url if server else args.base_url
            settings = LoadSettings(
                base_url=base_url,
                model=args.served_model_name or served_model_name(base_url),
                backend=backend,
                request_rate=args.request_rate,
                max_concurrency=concurrency,
                seed=args.seed,
                request_timeout_s=args.request_timeout,
            )
            memory_budget = server_memory_budget(base_url)
            result = asyncio.run(run_load(requests, settings, server.pid if server else args.server_pid))
            server_command = server.command if server else None
        metrics = summarize(result.traces, result.duration_s)
        print(format_metrics(engine, concurrency, metrics, result.peak_rss_bytes, memory_budget))
        record = run_record(result, metrics, memory_budget)
        results.append_run(
            output, results.new_run("serve", engine, settings_record(args, settings, server_command), record, versions)
        )
        failed = [trace.error for trace in result.traces if trace.error]
        if failed:
            logger.warning("%d requests failed; the first: %s", len(failed), failed[0])
    print(f"results appended to {output}")
    return 0
