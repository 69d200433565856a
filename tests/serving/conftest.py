"""One real server process for the whole session (started once, polled until healthy, stopped with SIGTERM),
an OpenAI client for it, and the same model loaded in-process for reference outputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"
API_KEY = "test-key-5b2f"
ALLOWED_ORIGIN = "http://allowed.test"
KV_CACHE_BYTES = 2**28
MAX_QUEUED_SEQUENCES = 48
MAX_REQUEST_SEQUENCES = 40
MAX_NUM_SEQS = 32
MAX_BODY_BYTES = 256 * 1024
STARTUP_TIMEOUT_S = 240.0
IDLE_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 60.0


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics but histogram buckets, keyed `name` or `name{label=value}` (model_name left out)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                if "le=" not in labels:
                    samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def wait_until_idle(self) -> dict[str, float]:
        """Poll /metrics until nothing runs and no KV block is held; fail past the deadline."""
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            metrics = self.metrics()
            if metrics["pagedllm_num_requests_running"] == 0 and metrics["pagedllm_kv_cache_usage_ratio"] == 0:
                return metrics
            assert time.monotonic() < deadline, f"the engine is still busy after {IDLE_TIMEOUT_S} s: {metrics}"
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server was not healthy within {STARTUP_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def stop_gracefully(server: Server) -> None:
    """SIGTERM while a stream is in flight: the stream must finish whole and the process exit 0."""
    streamed: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream(
            "POST", f"{server.base_url}/v1/completions", json=body, headers=server.auth, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line:
                    streamed.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60), server.log_tail()
    server.process.send_signal(signal.SIGTERM)
    reader.join(SHUTDOWN_TIMEOUT_S)
    returncode = server.process.wait(SHUTDOWN_TIMEOUT_S)
    assert streamed and streamed[-1] == "data: [DONE]", server.log_tail()
    assert any('"finish_reason":"length"' in line for line in streamed), server.log_tail()
    assert returncode == 0, server.log_tail()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / "serving-test-server.log"
    command = [
        sys.executable,
        "-m",
        "pagedllm.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory",
        str(KV_CACHE_BYTES),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--api-key",
        API_KEY,
        "--allowed-origins",
        ALLOWED_ORIGIN,
        "--max-queued-sequences",
        str(MAX_QUEUED_SEQUENCES),
        "--max-request-sequences",
        str(MAX_REQUEST_SEQUENCES),
        "--max-request-body-bytes",
        str(MAX_BODY_BYTES),
        "--shutdown-timeout",
        "30",
        # Dense float32 like the session's offline `llm`: outputs compare exactly with it, whatever the batch
        # (bfloat16 and the int4/dense switch by batch size round differently for different batch shapes).
        "--dtype",
        "float32",
        "--quantization",
        "none",
    ]
    # One torch thread per process: the server and the in-process reference model share two cores, and
    # oversubscribed intra-op threads make every step several times slower on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    handle = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until_healthy(handle)
        yield handle
        stop_gracefully(handle)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def model_name(server: Server) -> str:
    return httpx.get(f"{server.base_url}/v1/models", headers=server.auth, timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client_factory(server: Server) -> Callable[[], openai.AsyncOpenAI]:
    """AsyncOpenAI clients are bound to the event loop they are used in, so each test makes its own."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Reference outputs computed here run beside the server on the same cores (see the server fixture)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
