"""Limits on what a connection may cost before any handler runs: a deadline on each request's headers, and a
bound on their size and number (431, with an OpenAI error body)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagedllm.serving.error_responses import error_body, error_response

logger = logging.getLogger(__name__)

HEADERS_TOO_LARGE = 431


def _headers_too_large_message(max_header_bytes: int, max_headers: int) -> str:
    return (
        f"the request headers exceed {max_header_bytes} bytes or {max_headers} fields (max_header_bytes, max_headers)"
    )


class HeaderLimitMiddleware:
    """Answers 431 to a request whose headers, complete, are over `max_header_bytes` or `max_headers` fields."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_headers: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(name) + len(value) + 4 for name, value in headers)
            if len(headers) > self.max_headers or size > self.max_header_bytes:
                message = _headers_too_large_message(self.max_header_bytes, self.max_headers)
                await error_response(HEADERS_TOO_LARGE, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def guarded_h11_protocol(header_timeout_s: float, max_header_bytes: int, max_headers: int) -> type[H11Protocol]:
    """Uvicorn's h11 protocol closing a connection whose request headers take longer than `header_timeout_s`
    (uvicorn times out only idle keep-alive connections), and answering 431 as JSON to headers that outgrow
    h11's buffer (uvicorn answers a plain-text 400)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:
                self._arm_header_deadline()  # the next request's headers

        def send_400_response(self, msg: str) -> None:
            buffered = len(self.conn.trailing_data[0])
            if buffered <= max_header_bytes:
                super().send_400_response(msg)
                return
            body = json.dumps(
                error_body(_headers_too_large_message(max_header_bytes, max_headers), "invalid_request_error")
            ).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (
                h11.Response(status_code=HEADERS_TOO_LARGE, headers=headers, reason=b"Request Header Fields Too Large"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self.header_deadline = self.loop.call_later(header_timeout_s, self._on_header_deadline)

        def _disarm_header_deadline(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def _on_header_deadline(self) -> None:
            self.header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request headers in %.0f s", header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol
