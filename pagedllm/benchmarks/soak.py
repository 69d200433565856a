"""`python -m pagedllm.benchmarks.soak`: a soak and fault suite — ShareGPT chats under load, then the checks.

A float32 server on 127.0.0.1 gets `--num-requests` requests, `--concurrency` at a time: streamed chats with n > 1,
stop strings and logprobs, completions, clients that leave mid-stream, bad inputs and slow readers. Then: no 5xx,
every request finished or cleanly aborted, usage equal to the tokens streamed, nothing running, waiting or holding
KV blocks, resident memory back within `--rss-slack-mib` of its level after warm-up, and greedy answers equal to
the same requests sent alone. With `--fault-steps`, the engine fails those steps: the requests in flight then get a
clean error within 10 s and the rest finish as before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm

from pagedllm.benchmarks.datasets import first_exchange, iter_json_array_records, sharegpt_path
from pagedllm.benchmarks.memory import resident_bytes
from pagedllm.benchmarks.server_process import ServerProcess, free_port
from pagedllm.benchmarks.soak_clients import Outcome, choose_kind, greedy_alone, greedy_body, run_client
from pagedllm.engine.faults import ENV as FAULT_ENV

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1500
IDLE_TIMEOUT_S = 60.0
MAX_ERROR_WAIT_S = 10.0
MIB = 2**20


@dataclass(frozen=True)
class SoakConfig:
    num_requests: int = 1000
    concurrency: int = 64
    max_tokens: int = 24
    num_greedy_checks: int = 16
    fault_steps: str = ""  # engine steps that fail (PAGEDLLM_INJECT_STEP_FAULTS); empty: none
    kv_cache_memory: int = 2**30
    rss_slack_mib: float = 64.0
    request_timeout_s: float = 600.0
    seed: int = 0


@dataclass
class SoakReport:
    config: SoakConfig
    duration_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    usage_mismatches: int = 0
    fault_errors: int = 0
    max_error_wait_s: float = 0.0
    greedy_checked: int = 0
    greedy_mismatches: int = 0
    final_running: float = -1
    final_waiting: float = -1
    final_kv_cache_usage: float = -1
    rss_warm_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_end_mib: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def sharegpt_prompts(count: int, seed: int) -> list[str]:
    """`count` first human turns of ShareGPT conversations, short enough for a quick soak, in a seeded order."""
    prompts: list[str] = []
    with sharegpt_path() as path:
        for record in iter_json_array_records(path):
            pair = first_exchange(record.get("conversations") or [])
            if pair is not None and len(pair[0]) <= MAX_PROMPT_CHARS:
                prompts.append(pair[0])
            if len(prompts) >= 4 * count:
                break
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def server_command(port: int, config: SoakConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pagedllm.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--quantization",
        "none",
        "--kv-cache-memory",
        str(config.kv_cache_memory),
    ]


def engine_gauges(http_base: str) -> dict[str, float]:
    text = httpx.get(f"{http_base}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("pagedllm_")
    }


def wait_until_idle(base_url: str) -> dict[str, float]:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        gauges = engine_gauges(base_url)
        idle = gauges["pagedllm_num_requests_running"] == 0 and gauges["pagedllm_num_requests_waiting"] == 0
        if (idle and gauges["pagedllm_kv_cache_usage_ratio"] == 0) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


async def drive(
    base_url: str, prompts: list[str], config: SoakConfig, process: psutil.Process
) -> tuple[list[Outcome], int]:
    """Every request, at most `concurrency` at a time; with the server's peak RSS, sampled meanwhile."""
    rng = random.Random(config.seed)
    plan = [(choose_kind(index, rng), prompt, random.Random(rng.random())) for index, prompt in enumerate(prompts)]
    semaphore = asyncio.Semaphore(config.concurrency)
    limits = httpx.Limits(max_connections=config.concurrency + 8)
    peak = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=config.request_timeout_s, limits=limits) as http:
        bar = tqdm(total=len(plan), desc="soak", unit="req")

        async def one(kind: str, prompt: str, request_rng: random.Random) -> Outcome:
            async with semaphore:
                outcome = await run_client(http, kind, prompt, request_rng, config.max_tokens)
            bar.update()
            return outcome

        async def sample_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, resident_bytes(process))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_rss())
        try:
            outcomes = await asyncio.gather(*(one(*item) for item in plan))
        finally:
            sampler.cancel()
            bar.close()
    return list(outcomes), peak


async def greedy_replays(base_url: str, outcomes: list[Outcome], count: int) -> tuple[int, int]:
    """(checked, mismatched): greedy answers given under load against the same requests sent one at a time."""
    checked = mismatched = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        for outcome in [o for o in outcomes if o.kind == "greedy" and o.text is not None][:count]:
            assert outcome.body is not None
            alone = await greedy_alone(http, outcome.body)
            checked += 1
            if alone != outcome.text:
                mismatched += 1
                logger.warning("greedy mismatch:\n under load: %r\n alone:      %r", outcome.text, alone)
    return checked, mismatched


def judge(report: SoakReport, outcomes: list[Outcome]) -> None:
    """Fill the counts and the failures of `report` from what the clients saw."""
    fault_run = bool(report.config.fault_steps)
    kinds: Counter[str] = Counter()
    for outcome in outcomes:
        report.statuses[str(outcome.status)] = report.statuses.get(str(outcome.status), 0) + 1
        report.failures += [f"{outcome.kind}: {problem}" for problem in outcome.problems]
        by_fault = fault_run and outcome.error_type == "internal_error"
        if by_fault:
            report.fault_errors += 1
            report.max_error_wait_s = max(report.max_error_wait_s, outcome.max_gap_s)
        elif outcome.status is not None and outcome.status >= 500:
            report.failures.append(f"{outcome.kind}: HTTP {outcome.status} ({outcome.error_type})")
        if outcome.aborted:
            kinds["aborted"] += 1
        elif outcome.finished:
            kinds["finished"] += 1
            report.generated_tokens += outcome.streamed_tokens or 0
            if outcome.usage_tokens is not None and outcome.usage_tokens != outcome.streamed_tokens:
                report.usage_mismatches += 1
        elif outcome.kind == "bad" and outcome.status is not None and 400 <= outcome.status < 500:
            kinds["refused_bad_input"] += 1
        elif by_fault:
            kinds["failed_by_fault"] += 1
        else:
            kinds["unfinished"] += 1
            report.failures.append(f"{outcome.kind}: neither finished nor aborted (status {outcome.status})")
    report.outcomes = dict(kinds)
    if report.usage_mismatches:
        report.failures.append(f"{report.usage_mismatches} responses whose usage differs from the tokens streamed")
    if fault_run and not report.fault_errors:
        report.failures.append("the injected fault failed no request")
    if report.max_error_wait_s > MAX_ERROR_WAIT_S:
        report.failures.append(f"a client waited {report.max_error_wait_s:.1f} s for its error")


def run_soak(config: SoakConfig) -> SoakReport:
    """Start a server, soak it, check it; the report lists every failed check."""
    report = SoakReport(config)
    prompts = sharegpt_prompts(config.num_requests, config.seed)
    port = free_port()
    env = {**os.environ, FAULT_ENV: config.fault_steps}
    with ServerProcess(server_command(port, config), port, "pagedllm-soak", env=env) as server:
        process = psutil.Process(server.pid)
        base_url = server.base_url
        httpx.post(f"{base_url}/v1/chat/completions", json=greedy_body(prompts[0], config.max_tokens), timeout=120)
        wait_until_idle(base_url)
        report.rss_warm_mib = resident_bytes(process) / MIB
        started = time.monotonic()
        outcomes, peak_rss = asyncio.run(drive(base_url, prompts, config, process))
        report.duration_s = time.monotonic() - started
        report.rss_peak_mib = peak_rss / MIB
        gauges = wait_until_idle(base_url)
        report.final_running = gauges["pagedllm_num_requests_running"]
        report.final_waiting = gauges["pagedllm_num_requests_waiting"]
        report.final_kv_cache_usage = gauges["pagedllm_kv_cache_usage_ratio"]
        report.rss_end_mib = resident_bytes(process) / MIB
        report.greedy_checked, report.greedy_mismatches = asyncio.run(
            greedy_replays(base_url, outcomes, config.num_greedy_checks)
        )
        health = httpx.get(f"{base_url}/health", timeout=10).status_code
        logger.info("server log: %s", server.log_path)
    judge(report, outcomes)
    if (report.final_running, report.final_waiting, report.final_kv_cache_usage) != (0, 0, 0):
        report.failures.append(
            f"not idle at the end: running {report.final_running}, waiting {report.final_waiting}, "
            f"KV usage {report.final_kv_cache_usage}"
        )
    if report.rss_end_mib - report.rss_warm_mib > config.rss_slack_mib:
        report.failures.append(
            f"resident memory {report.rss_end_mib:.0f} MiB at the end, {report.rss_warm_mib:.0f} MiB after warm-up"
        )
    if report.greedy_mismatches:
        report.failures.append(f"{report.greedy_mismatches} of {report.greedy_checked} greedy answers changed alone")
    if health != 200:
        report.failures.append(f"/health answers {health} after the soak")
    return report


def summary(report: SoakReport) -> str:
    c = report.config
    lines = [
        f"soak: {c.num_requests} requests at concurrency {c.concurrency}"
        + (f", engine faults at steps {c.fault_steps}" if c.fault_steps else "")
        + f": {report.duration_s:.0f} s",
        f"  outcomes {report.outcomes}; HTTP statuses {report.statuses}",
        f"  tokens streamed {report.generated_tokens}; usage mismatches {report.usage_mismatches}",
        f"  requests failed by the fault {report.fault_errors}; "
        f"longest wait for that error {report.max_error_wait_s:.1f} s",
        f"  at the end: running {report.final_running:.0f}, waiting {report.final_waiting:.0f}, "
        f"KV usage {report.final_kv_cache_usage:.3f}",
        f"  RSS after warm-up {report.rss_warm_mib:.0f} MiB, peak {report.rss_peak_mib:.0f} MiB, "
        f"end {report.rss_end_mib:.0f} MiB",
        f"  greedy answers equal alone: {report.greedy_checked - report.greedy_mismatches}/{report.greedy_checked}",
        "  PASS" if report.ok else "  FAIL:\n    " + "\n    ".join(report.failures[:20]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SoakConfig()
    parser.add_argument("--num-requests", type=int, default=defaults.num_requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--fault-steps", default="", help="also run a soak whose engine fails these steps")
    parser.add_argument("--fault-num-requests", type=int, help="requests of the fault run (default: --num-requests)")
    parser.add_argument("--output-json", type=Path, help="write both reports here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    base = SoakConfig(num_requests=args.num_requests, concurrency=args.concurrency, max_tokens=args.max_tokens)
    configs = [base]
    if args.fault_steps:
        num_requests = args.fault_num_requests or args.num_requests
        configs.append(SoakConfig(**{**asdict(base), "fault_steps": args.fault_steps, "num_requests": num_requests}))
    reports = []
    for config in configs:
        report = run_soak(config)
        print(summary(report), flush=True)
        reports.append(report)
    if args.output_json:
        args.output_json.write_text(json.dumps([{**asdict(r), "ok": r.ok} for r in reports], indent=2))
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
