"""The server's own settings (its command-line flags are generated from these fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pagedllm.errors import ConfigError

API_KEY_ENV = "PAGEDLLM_API_KEY"


@dataclass
class ServerSettings:
    """How the HTTP server listens and guards itself; the flags and their names come from these fields."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for every interface)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize (default: ${API_KEY_ENV})"
        },
    )
    allowed_origins: list[str] = field(
        default_factory=list,
        metadata={"help": "origins allowed by CORS, e.g. http://localhost:3000 (default: none, CORS off)"},
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "model name clients use (default: the model's)"}
    )
    max_queued_sequences: int = field(
        default=256,
        metadata={"help": "sequences waiting for their first token beyond which new requests get 503 and Retry-After"},
    )
    max_request_sequences: int = field(
        default=64,
        metadata={"help": "sequences (prompts x best_of, or beam width) one request may ask for; more get 400"},
    )
    max_chat_messages: int = field(default=2048, metadata={"help": "chat requests with more messages get 400"})
    max_request_body_bytes: int = field(default=1 << 20, metadata={"help": "larger request bodies get 413"})
    max_header_bytes: int = field(default=16 * 1024, metadata={"help": "larger request headers get 431"})
    max_headers: int = field(default=100, metadata={"help": "requests with more header fields get 431"})
    header_timeout: float = field(
        default=10.0, metadata={"help": "seconds a connection may take to send a request's headers before it is closed"}
    )
    keep_alive_timeout: float = field(
        default=5.0, metadata={"help": "seconds an idle keep-alive connection stays open between requests"}
    )
    headless: bool = field(
        default=False,
        metadata={
            "help": "run only this node's ranks of an engine that spans nnodes machines (node_rank > 0): no "
            "engine and no HTTP here; they stop when node 0's engine does"
        },
    )
    shutdown_timeout: int = field(
        default=30,
        metadata={"help": "seconds in-flight requests may take to finish after SIGTERM before they are aborted"},
    )

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        positive = (
            "max_queued_sequences",
            "max_request_sequences",
            "max_chat_messages",
            "max_header_bytes",
            "max_headers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_sequences > self.max_queued_sequences:
            raise ConfigError(
                f"max_request_sequences={self.max_request_sequences} exceeds max_queued_sequences="
                f"{self.max_queued_sequences}: such a request could never be queued"
            )
        for name in ("header_timeout", "keep_alive_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
