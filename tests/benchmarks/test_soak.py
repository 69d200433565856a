"""The soak and fault suite, short: 40 requests of every kind on a float32 server whose engine fails one step."""

from __future__ import annotations

from pagedllm.benchmarks.soak import SoakConfig, SoakReport, judge, run_soak, summary
from pagedllm.benchmarks.soak_clients import Outcome


def test_a_short_soak_with_an_engine_fault_passes_every_check() -> None:
    config = SoakConfig(num_requests=40, concurrency=8, max_tokens=8, num_greedy_checks=2, fault_steps="30")
    report = run_soak(config)
    assert report.ok, summary(report)
    assert report.outcomes["finished"] > 0 and report.outcomes["aborted"] > 0
    assert report.outcomes["refused_bad_input"] > 0 and report.fault_errors > 0
    assert report.greedy_checked == 2
    assert (report.final_running, report.final_waiting, report.final_kv_cache_usage) == (0, 0, 0)


def test_the_judge_fails_a_5xx_a_usage_mismatch_and_an_unfinished_request() -> None:
    report = SoakReport(SoakConfig())
    outcomes = [
        Outcome("chat_stream", status=200, finished=True, usage_tokens=5, streamed_tokens=5),
        Outcome("completion", status=500, error_type="internal_error"),
        Outcome("chat_stream", status=200, finished=True, usage_tokens=6, streamed_tokens=5),
        Outcome("slow", status=200, problems=["the stream ended without [DONE]"]),
    ]
    judge(report, outcomes)
    assert not report.ok
    assert report.usage_mismatches == 1
    assert any("HTTP 500" in failure for failure in report.failures)
    assert any("without [DONE]" in failure for failure in report.failures)
    assert any("neither finished nor aborted" in failure for failure in report.failures)
