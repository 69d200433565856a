"""An HTTP server run as a child process for a benchmark: started, awaited until it answers, stopped."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited, or did not answer in time; the message ends with its log."""


class ServerProcess:
    """`with ServerProcess([...], port) as server:` runs an OpenAI-compatible server for the block."""

    def __init__(
        self,
        command: list[str],
        port: int,
        name: str,
        ready_timeout_s: float = READY_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.port = port
        self.name = name
        self.ready_timeout_s = ready_timeout_s
        self.log_path = Path(tempfile.mkstemp(prefix=f"pagedllm-bench-{name}-", suffix=".log")[1])
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "the server is not running"
        return self._process.pid

    def __enter__(self) -> ServerProcess:
        logger.info("Starting %s: %s (log: %s)", self.name, " ".join(self.command), self.log_path)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        """Poll /v1/models until it answers 200 (llama.cpp answers 503 while it loads)."""
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerStartError(f"{self.name} exited with status {self._process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=2.0).status_code == 200:
                    logger.info("%s is ready on %s", self.name, self.base_url)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise ServerStartError(f"{self.name} did not answer within {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, STOP_TIMEOUT_S)
            self._process.kill()
            self._process.wait()

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-LOG_TAIL_CHARS:]
