"""The server's own settings (its command-line flags are generated from these fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    max_queued_requests: int = field(
        default=256, metadata={"help": "requests waiting for their first token beyond which new ones get 503"}
    )
    max_request_body_bytes: int = field(default=1 << 20, metadata={"help": "larger request bodies get 413"})
    shutdown_timeout: int = field(
        default=30,
        metadata={"help": "seconds in-flight requests may take to finish after SIGTERM before they are aborted"},
    )

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
