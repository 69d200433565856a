"""The real uvicorn server (h11, the connection limits, the drain) over the app with a fake engine, in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from pagedllm.serving.api_server import create_app, uvicorn_config
from pagedllm.serving.settings import ServerSettings
from pagedllm.serving.shutdown import DrainingServer

from .conftest import free_port
from .fake_engine import FakeEngine

START_TIMEOUT_S = 10.0


@dataclass
class LiveServer:
    base_url: str
    port: int
    server: DrainingServer
    fake: FakeEngine
    thread: threading.Thread


@contextmanager
def live_fake_server(**settings: object) -> Iterator[LiveServer]:
    """Serve the fake engine on 127.0.0.1 until the block ends (or the test makes the server exit)."""
    port = free_port()
    fake = FakeEngine()
    server_settings = ServerSettings(host="127.0.0.1", port=port, **settings)  # type: ignore[arg-type]
    app = create_app(fake, server_settings)  # type: ignore[arg-type]
    config = uvicorn_config(app, server_settings)
    config.log_level = "warning"
    server = DrainingServer(config, app.state.drain)
    thread = threading.Thread(target=server.run, name="live-fake-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", port, server, fake, thread)
    finally:
        fake.steps_allowed.set()
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
        assert not thread.is_alive(), "the server did not stop"
        httpx.Client().close()
