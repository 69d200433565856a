"""Starting, awaiting and stopping a server subprocess."""

from __future__ import annotations

import sys

import httpx
import pytest

from pagedllm.benchmarks.server_process import ServerProcess, ServerStartError, free_port

MODELS_SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(b'{"data": [{"id": "m"}]}')
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_server_is_ready_then_stopped() -> None:
    port = free_port()
    with ServerProcess([sys.executable, "-c", MODELS_SERVER, str(port)], port, "fake") as server:
        assert httpx.get(f"{server.base_url}/v1/models").json() == {"data": [{"id": "m"}]}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/v1/models")


def test_a_server_that_exits_reports_its_log() -> None:
    command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(ServerStartError, match=r"(?s)status 3.*no model here"):
        ServerProcess(command, free_port(), "broken").__enter__()
