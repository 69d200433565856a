"""What a client can no longer do to the server: ask for more than it can ever hold, hold connections open with
half a header, send headers without bound, or lose its stream on SIGTERM; and what /metrics says of the queue."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import pytest

from .live_fake_server import live_fake_server
from .test_app_with_fake_engine import with_app

DEADLINE_S = 10.0


def test_more_sequences_than_a_request_may_hold_is_a_400_naming_the_limit() -> None:
    async def scenario(http: httpx.AsyncClient, fake: object) -> list[httpx.Response]:
        many_prompts = await http.post("/v1/completions", json={"prompt": [[1, 2]] * 300, "max_tokens": 2})
        times_n = await http.post("/v1/completions", json={"prompt": [[1]] * 40, "n": 2, "max_tokens": 2})
        chat_n = await http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 65, "max_tokens": 2}
        )
        within = await http.post("/v1/completions", json={"prompt": [[1]] * 64, "max_tokens": 2})
        return [many_prompts, times_n, chat_n, within]

    many_prompts, times_n, chat_n, within = with_app(scenario)
    for response, asked in ((many_prompts, 300), (times_n, 80), (chat_n, 65)):
        assert response.status_code == 400, response.text
        assert "retry-after" not in response.headers
        error = response.json()["error"]
        assert f"asks for {asked} sequences" in error["message"]
        assert "max_request_sequences" in error["message"]
    assert within.status_code == 200, within.text
    assert len(within.json()["choices"]) == 64


def test_too_many_messages_is_a_400_before_the_template_runs() -> None:
    async def scenario(http: httpx.AsyncClient, fake: object) -> httpx.Response:
        # The fake engine has no tokenizer: reaching the template would be a 500.
        body = json.dumps({"messages": [{"role": "user"}] * 50000, "max_tokens": 2}, separators=(",", ":"))
        return await http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})

    response = with_app(scenario)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "50000 messages" in response.json()["error"]["message"]
    assert "max_chat_messages" in response.json()["error"]["message"]


def test_metrics_show_the_queue_depth_and_the_rejected_requests() -> None:
    async def scenario(http: httpx.AsyncClient, fake: object) -> tuple[str, httpx.Response, str]:
        fake.steps_allowed.clear()  # type: ignore[attr-defined]
        waiting = asyncio.create_task(http.post("/v1/completions", json={"prompt": [[1]] * 3, "max_tokens": 1}))
        while 'pagedllm_num_sequences_queued{model_name="fake"} 3.0' not in (await http.get("/metrics")).text:
            await asyncio.sleep(0.01)
        during = (await http.get("/metrics")).text
        refused = await http.post("/v1/completions", json={"prompt": [1], "n": 2, "max_tokens": 1})
        fake.steps_allowed.set()  # type: ignore[attr-defined]
        assert (await waiting).status_code == 200
        return during, refused, (await http.get("/metrics")).text

    during, refused, after = with_app(scenario, max_queued_sequences=4, max_request_sequences=4)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "3 sequences waiting" in refused.json()["error"]["message"]
    assert 'pagedllm_requests_rejected_total{model_name="fake"} 0.0' in during
    assert 'pagedllm_requests_rejected_total{model_name="fake"} 1.0' in after
    assert 'pagedllm_num_sequences_queued{model_name="fake"} 0.0' in after


def raw_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (read returns EOF or a reset)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_connections_that_send_no_complete_headers_are_closed() -> None:
    with live_fake_server(header_timeout=0.5, keep_alive_timeout=30) as live:
        silent = raw_connection(live.port)
        half = raw_connection(live.port)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        dribbling = raw_connection(live.port)
        started = time.monotonic()
        try:  # a header byte every 0.1 s, each well inside the keep-alive timeout
            while time.monotonic() - started < DEADLINE_S:
                dribbling.sendall(b"X")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert time.monotonic() - started < 3, "a connection dribbling its headers stayed open"
        assert closed_by_server(silent)
        assert closed_by_server(half)
        healthy = httpx.get(f"{live.base_url}/health", timeout=DEADLINE_S)
        assert healthy.status_code == 200


def test_a_slow_request_body_is_not_cut_by_the_header_deadline() -> None:
    with live_fake_server(header_timeout=0.3) as live:
        sock = raw_connection(live.port)
        body = json.dumps({"prompt": [1, 2], "max_tokens": 2}).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5]
        )
        time.sleep(0.6)
        sock.sendall(body[5:])
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Big": "a" * 100_000},  # arrives whole: the app's check
        {f"X-{i}": "1" for i in range(10_000)},
        {"X-Big": "a" * 17_000},  # past h11's buffer while incomplete: the protocol's check
    ],
    ids=["one 100 KB header", "10,000 headers", "17 KB header"],
)
def test_oversized_headers_get_a_431_error_body(headers: dict[str, str]) -> None:
    with live_fake_server() as live:
        response = httpx.get(f"{live.base_url}/health", headers=headers, timeout=DEADLINE_S)
        assert response.status_code == 431, response.text
        assert "max_header_bytes" in response.json()["error"]["message"]
        assert httpx.get(f"{live.base_url}/health", timeout=DEADLINE_S).status_code == 200


def test_sigterm_drains_then_ends_open_streams_with_an_error_event_and_done() -> None:
    with live_fake_server(shutdown_timeout=1) as live:
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": [1], "max_tokens": 10**6, "stream": True}
            with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body, timeout=DEADLINE_S) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(DEADLINE_S)
        started = time.monotonic()
        live.server.handle_exit(signal.SIGTERM, None)
        health = httpx.get(f"{live.base_url}/health", timeout=DEADLINE_S)
        refused = httpx.post(f"{live.base_url}/v1/completions", json={"prompt": [1]}, timeout=DEADLINE_S)
        reader.join(DEADLINE_S)
        live.thread.join(DEADLINE_S)
        assert health.status_code == 503
        assert "shutting down" in health.json()["error"]["message"]
        assert refused.status_code == 503
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "service_unavailable"
        assert not live.thread.is_alive()
        assert time.monotonic() - started < DEADLINE_S


def test_health_is_503_and_requests_fail_fast_once_the_engine_loop_has_died() -> None:
    async def scenario(http: httpx.AsyncClient, fake: object) -> tuple[int, httpx.Response, httpx.Response, int]:
        before = (await http.get("/health")).status_code

        def broken_stats() -> None:
            raise RuntimeError("the engine broke outside a step")

        fake.stats = broken_stats  # type: ignore[attr-defined]
        started = time.monotonic()
        in_flight = await http.post("/v1/completions", json={"prompt": [1], "max_tokens": 50})
        health = await http.get("/health")
        later = await http.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
        return before, in_flight, later, health.status_code if time.monotonic() - started < DEADLINE_S else -1

    before, in_flight, later, health = with_app(scenario)
    assert before == 200
    assert in_flight.status_code == 503 and in_flight.json()["error"]["type"] == "service_unavailable"
    assert later.status_code == 503
    assert health == 503
