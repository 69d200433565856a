"""One exception hierarchy; each class carries the HTTP status the server answers with."""


class PagedLLMError(Exception):
    """Base of every error pagedllm raises on purpose."""

    http_status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgumentError(PagedLLMError, ValueError):
    """A parameter is out of range or of the wrong kind."""

    http_status = 400
    error_type = "invalid_request_error"


class ConfigError(InvalidArgumentError):
    """An engine setting is invalid."""


class RequestTooLongError(InvalidArgumentError):
    """A request could never fit the context window or the whole KV cache."""


class ModelNotFoundError(PagedLLMError):
    """A model name or path that resolves to nothing."""

    http_status = 404
    error_type = "not_found_error"


class UnsupportedModelError(PagedLLMError, ValueError):
    """An architecture, tensor type or setting the model runtime does not support."""

    http_status = 400
    error_type = "invalid_request_error"


class EngineOverloadedError(PagedLLMError):
    """The queue of requests waiting for their first token is full; retry later."""

    http_status = 503
    error_type = "server_overloaded"
    retry_after_s = 1


class EngineUnavailableError(PagedLLMError):
    """The engine is stopping or has stopped."""

    http_status = 503
    error_type = "service_unavailable"


class ReplicaLostError(PagedLLMError):
    """The data-parallel replica serving these requests died; they are dropped, the other replicas go on."""

    http_status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


class EngineStepError(PagedLLMError):
    """A step failed while the request was in flight; the request was dropped, the engine goes on."""

    http_status = 500
    error_type = "internal_error"
