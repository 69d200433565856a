"""Every error the server answers, in OpenAI's shape {"error": {message, type, param, code}}; the one place
where exceptions become HTTP statuses."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pagedllm.errors import EngineOverloadedError, PagedLLMError
from pagedllm.serving.protocol import INVALID_TEXT

logger = logging.getLogger(__name__)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    error_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def exception_body(error: PagedLLMError) -> dict[str, Any]:
    return error_body(error.message, error.error_type, error.param)


def exception_response(error: PagedLLMError) -> JSONResponse:
    """A pagedllm error as the response its class names (status, type, and Retry-After when overloaded)."""
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, EngineOverloadedError) else None
    return JSONResponse(exception_body(error), status_code=error.http_status, headers=headers)


def validation_response(error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or does not fit the schema: 400 naming the first offending field."""
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == INVALID_TEXT:
        path = first["ctx"]["path"]
        return error_response(400, first["msg"], None if path == "the body" else path.split(".")[0])
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(400, f"the body is not valid JSON: {detail}".rstrip(": "))
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field_path = ".".join(location)
    message = f"{field_path or 'the body'}: {first.get('msg', 'invalid value')}"
    return error_response(400, message, location[0] if location else None)


def http_exception_response(error: HTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
    if error.status_code == 404 and message == HTTPStatus.NOT_FOUND.phrase:
        message = "no such route"
    return error_response(error.status_code, message, headers=dict(error.headers) if error.headers else None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise to its OpenAI-shaped response."""

    @app.exception_handler(PagedLLMError)
    async def on_pagedllm_error(request: Request, error: PagedLLMError) -> JSONResponse:
        if error.http_status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, error.message)
        return exception_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_response(error)

    @app.exception_handler(HTTPException)
    async def on_http_exception(request: Request, error: HTTPException) -> JSONResponse:
        return http_exception_response(error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}")
