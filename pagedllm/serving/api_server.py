"""The OpenAI-compatible HTTP server: the FastAPI app and its routes, and `pagedllm serve`'s flags and runner."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from pagedllm import __version__
from pagedllm.config import EngineConfig
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.data_parallel import DataParallelEngine, create_engine
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.executor import run_headless
from pagedllm.errors import InvalidArgumentError, ModelNotFoundError, PagedLLMError
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.serving.chat import create_chat_completion
from pagedllm.serving.completions import create_completion
from pagedllm.serving.connection_limits import HeaderLimitMiddleware, guarded_h11_protocol
from pagedllm.serving.error_responses import error_response, install_error_handlers
from pagedllm.serving.generation import RequestLimits, ServingContext
from pagedllm.serving.logprobs import TokenStrings
from pagedllm.serving.metrics import ServingMetrics
from pagedllm.serving.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from pagedllm.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    VersionResponse,
)
from pagedllm.serving.responses import ResponsesRequest, create_response
from pagedllm.serving.settings import ServerSettings
from pagedllm.serving.shutdown import FLUSH_TIMEOUT_S, Drain, DrainingServer, DrainMiddleware
from pagedllm.serving.tool_parsers import parser_for_template

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; never seen by it
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 431, 500, 503)
}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON, or SSE when stream is true",
    },
}

T = TypeVar("T")


async def _client_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """Run a handler's work, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    logger.info("%s: the client disconnected; its requests were aborted", request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def create_app(engine: LLMEngine | DataParallelEngine, settings: ServerSettings) -> FastAPI:
    """The app serving `engine`; its lifespan starts and stops the engine thread."""
    model_name = settings.served_model_name or engine.model_name
    metrics = ServingMetrics(model_name)
    async_engine = AsyncLLMEngine(engine, settings.max_queued_sequences, observer=metrics)
    metrics.watch(async_engine.stats)
    metrics.watch_queue(lambda: async_engine.num_queued, lambda: async_engine.num_rejected)
    metrics.set_memory(engine.weight_bytes, engine.kv_cache_bytes, engine.file_weight_bytes)
    limits = RequestLimits(settings.max_request_sequences, settings.max_chat_messages)
    context = ServingContext(
        async_engine,
        model_name,
        TokenStrings(engine.tokenizer),
        engine.grammars,
        parser_for_template(engine.tokenizer.chat_template if engine.tokenizer is not None else None),
        limits,
    )
    drain = Drain(async_engine, settings.shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="pagedllm", version=__version__, lifespan=lifespan, summary="OpenAI-compatible LLM server")
    app.state.engine = async_engine
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(DrainMiddleware, drain=drain)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        HeaderLimitMiddleware, max_header_bytes=settings.max_header_bytes, max_headers=settings.max_headers
    )

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {model_name!r}", "model")

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def health() -> HealthResponse | JSONResponse:
        if drain.draining:
            return error_response(503, "the server is shutting down")
        if not async_engine.is_running:
            return error_response(503, "the engine is not running")
        return HealthResponse()

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        card = ModelCard(id=model_name, created=context.started, max_model_len=async_engine.max_model_len)
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_name, created=context.started, max_model_len=async_engine.max_model_len)

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info() -> TokenizerInfo:
        hf = async_engine.tokenizer.hf
        return TokenizerInfo(
            tokenizer_class=type(hf).__name__,
            vocab_size=async_engine.tokenizer.vocab_size,
            model_max_length=async_engine.max_model_len,
            bos_token=hf.bos_token,
            eos_token=hf.eos_token,
            pad_token=hf.pad_token,
            chat_template=async_engine.tokenizer.chat_template,
        )

    @app.post("/v1/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        return await cancel_on_disconnect(request, create_completion(body, context))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        return await cancel_on_disconnect(request, create_chat_completion(body, context))

    @app.post("/v1/responses", responses=GENERATION_RESPONSES)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        check_model(body.model)
        return await cancel_on_disconnect(request, create_response(body, context))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        tokenizer = async_engine.tokenizer
        if body.prompt is not None and body.messages is None:
            context.check_text(body.prompt, "prompt")
            tokens = await asyncio.to_thread(tokenizer.encode, body.prompt, body.add_special_tokens)
        elif body.messages is not None and body.prompt is None:
            context.check_messages(len(body.messages))
            messages = [message.as_template_message() for message in body.messages]
            tokens = await asyncio.to_thread(tokenizer.encode_chat, messages, True, context.max_prompt_chars)
        else:
            raise InvalidArgumentError("give exactly one of prompt and messages", "prompt")
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=async_engine.max_model_len)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        tokenizer = async_engine.tokenizer
        if any(not 0 <= token < tokenizer.vocab_size for token in body.tokens):
            raise InvalidArgumentError(f"token ids must be in [0, {tokenizer.vocab_size})", "tokens")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(prompt=text)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`pagedllm serve`'s flags: every EngineConfig field, then the server's own."""
    add_dataclass_arguments(parser.add_argument_group("engine"), EngineConfig)
    add_dataclass_arguments(parser.add_argument_group("server"), ServerSettings)


def uvicorn_config(app: FastAPI, settings: ServerSettings) -> uvicorn.Config:
    """Uvicorn over h11 with the server's connection limits; the drain, not uvicorn, bounds the shutdown."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_h11_protocol(settings.header_timeout, settings.max_header_bytes, settings.max_headers),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout,
        timeout_graceful_shutdown=int(FLUSH_TIMEOUT_S),
        log_level="info",
        access_log=True,
    )


def _graceful_exit(signum: int, frame: FrameType | None) -> None:
    """Uvicorn re-raises the signal that stopped it once it has drained; by then it is handled."""
    logger.info("stopped by %s", signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM or Ctrl-C, drain in-flight requests; 0 on a clean stop."""
    settings = dataclass_from_args(ServerSettings, args)
    try:
        config = dataclass_from_args(EngineConfig, args)
        if settings.headless:
            return run_headless(config)
        engine = create_engine(config)
    except PagedLLMError as error:
        logger.error("cannot start the server: %s", error.message)
        return 2
    app = create_app(engine, settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.drain)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, _graceful_exit) for signum in handled}
    try:
        server.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if server.started else 1
