"""The starlette app and its uvicorn launch. The app's lifespan owns the AsyncEngine.

    app = build_app(EngineConfig(model="demo", device="cpu"), ServerConfig(port=8000))
    run_server(engine_config, server_config)          # uvicorn, uvloop + httptools, blocking

One process, one event loop (DESIGN.md): uvicorn runs the lifespan on its (uv)loop, the lifespan
starts the engine there, so the engine loop task, HTTP handlers and WebSocket connections share
that loop and no IPC sits between the front end and the scheduler.

Routes: POST /v1/chat/completions, /v1/completions, /v1/messages and
/v1/messages/count_tokens (Anthropic's Messages API, anthropic.py), /v1/responses (OpenAI's
Responses API, responses_api.py; GET / DELETE /v1/responses/{id}); GET /v1/models,
/v1/models/{model};
WebSocket /v1/ws; GET /health
and GET|POST /ping (200, or 503 when the engine is dead or not started; empty bodies, as vLLM),
POST /invocations (SageMaker's: dispatched by the body to chat / completions / responses),
/version, /metrics (Prometheus text), POST /tokenize, /detokenize, /reset_prefix_cache (vLLM's
dev-mode route: forget the cached prefix blocks). Unknown routes and methods
answer with the OpenAI error body (404/405). `--api-key` guards /v1/* (auth.py).

CORS (vLLM's api_server: starlette's CORSMiddleware with `--allowed-origins`, `--allowed-methods`,
`--allowed-headers` (JSON lists, each default ["*"]) and `--allow-credentials` (default off)): a
browser preflight (OPTIONS + Origin + Access-Control-Request-Method) is answered 200 with the
Access-Control-* headers, on every route. The middleware is the outermost layer, so the 401 of a
missing API key carries the headers too and a browser client can read it (vLLM's auth middleware
sits outside its CORS one, which leaves its 401s without them).

Request heads (request line + headers) are bounded by `max_header_bytes` (431 beyond, as h11's
16 KiB default does; uvicorn's httptools parser has no limit: a client could stream gigabytes of
one header into memory). See `BoundedHttpToolsProtocol`.

Shutdown (SIGINT/SIGTERM): uvicorn stops accepting, gives open connections up to
`shutdown_timeout` seconds, then the lifespan drains the engine (same timeout) and shuts it down.
Requests still running a little before that timeout are aborted (_abort_before_deadline): an SSE
stream ends with an error event and [DONE], a WebSocket request with a 503 `error` frame. Open
WebSocket sockets are drained too (websocket.py): new `generate` frames get 503 error frames, an
idle socket is closed at once and a busy one once its requests end, with code 1001. The process
then exits with status 0 (SIGTERM; `vllm serve` does the same) or 130 (SIGINT, via the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from atom_stream.cli import package_version
from atom_stream.config import EngineConfig
from atom_stream.engine.prompts import CONTENT_FORMATS
from atom_stream.sampling_params import model_sampling_defaults
from atom_stream.server.anthropic import AnthropicServing
from atom_stream.server.anthropic import error_response as anthropic_error_response
from atom_stream.server.auth import APIKeyMiddleware, KeyChecker
from atom_stream.server.chat_parsing import check_parser_names
from atom_stream.server.invocations import invocations_route
from atom_stream.server.metrics import CONTENT_TYPE, FrontendMetrics
from atom_stream.server.openai import OpenAIServing
from atom_stream.server.request_ids import RequestIdHeaderMiddleware
from atom_stream.server.responses import HTTPError, json_response
from atom_stream.server.responses_api import ResponsesServing
from atom_stream.server.tokenization import Tokenization
from atom_stream.server.websocket import WebSocketEndpoint
from atom_stream.server.ws_protocol import BatchingWebSocketProtocol, shutdown_abort_delay

logger = logging.getLogger("atom_stream.server")


@dataclass
class ServerConfig:
    """Front-end settings (the CLI's server flags). Engine settings live in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    served_model_name: list[str] | None = None
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 64 << 10  # request line + headers of one HTTP request (431 beyond)
    ws_max_frame_bytes: int | None = None  # default: max_body_bytes
    ws_max_requests: int = 1024  # live requests per WebSocket connection
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0
    ws_auth_timeout_s: float = 10.0
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = True
    timeout_keep_alive: int = 5
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # CORS: vLLM's FrontendArgs names and defaults (cli_args.py)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    # vLLM's --enable-request-id-headers: X-Request-Id on every HTTP response
    enable_request_id_headers: bool = False
    # vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details only when set
    enable_prompt_tokens_details: bool = False
    # vLLM's --enable-auto-tool-choice / --tool-call-parser / --reasoning-parser
    # (server/chat_parsing.py; names: tool_parsers.TOOL_PARSERS, REASONING_PARSERS)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # vLLM's --ssl-keyfile / --ssl-certfile / --ssl-ca-certs / --ssl-cert-reqs and --root-path
    # (uvicorn's options): HTTPS and WSS with a key and certificate; ssl_cert_reqs is the ssl
    # module's verify mode for client certificates (0 none, 1 optional, 2 required)
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0
    root_path: str = ""
    # vLLM's --chat-template-content-format: how message content reaches the template
    # ("auto": from the template, engine/prompts.resolve_content_format)
    chat_template_content_format: str = "auto"

    def __post_init__(self) -> None:
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            # a bare string would be iterated per character by CORSMiddleware
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}: must be a list of strings, got {value!r}")
            setattr(self, name, list(value))
        if self.ws_max_frame_bytes is None:
            self.ws_max_frame_bytes = self.max_body_bytes
        for name in ("max_body_bytes", "max_header_bytes", "ws_max_frame_bytes",
                     "ws_max_requests"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be a positive integer")
        # None (ping off) where uvicorn takes it; a negative time is a typo, never a setting
        for name in ("ws_ping_interval", "ws_ping_timeout", "ws_auth_timeout_s",
                     "shutdown_timeout", "timeout_keep_alive"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name}: must be >= 0 seconds, got {value!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        check_parser_names(self.tool_call_parser, self.reasoning_parser,
                           self.enable_auto_tool_choice)
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError("chat_template_content_format: one of auto, string, openai; got "
                             f"{self.chat_template_content_format!r}")
        self._check_tls()

    def _check_tls(self) -> None:
        """A clear start-up error for TLS settings uvicorn would fail on later."""
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile go together (HTTPS needs both)")
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {path}")
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ValueError(f"ssl_cert_reqs: 0 (none), 1 (optional) or 2 (required), got "
                             f"{self.ssl_cert_reqs!r}")
        if self.ssl_cert_reqs and (self.ssl_ca_certs is None or self.ssl_keyfile is None):
            raise ValueError("ssl_cert_reqs verifies client certificates: it needs "
                             "ssl_ca_certs and HTTPS (ssl_keyfile, ssl_certfile)")


class ServerState:
    """What the handlers share: configs, the engine (set by the lifespan), metrics, auth."""

    def __init__(self, engine_config: EngineConfig, config: ServerConfig):
        self.engine_config = engine_config
        self.config = config
        names = config.served_model_name or [engine_config.served_model_name
                                             or engine_config.model or "demo"]
        self.model_names: list[str] = list(names)
        self.engine: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop (lifespan)
        self.metrics = FrontendMetrics(self.model_names[0])
        self.key_checker = KeyChecker(config.api_keys)
        self.started = int(time.time())
        # the checkpoint's generation_config.json sampling defaults (vLLM's
        # get_diff_sampling_param), for the fields an OpenAI request leaves out
        self.default_sampling = model_sampling_defaults(engine_config.model)
        self.deadline_abort: asyncio.Task | None = None  # run_server's shutdown-deadline abort


def build_app(engine_config: EngineConfig, config: ServerConfig | None = None, *,
              engine: Any = None) -> Starlette:
    """The ASGI app. `engine`: an already started AsyncEngine to serve (not shut down by the
    app); by default the lifespan builds one from `engine_config` and owns it."""
    config = config or ServerConfig()
    if engine is None and config.served_model_name and not engine_config.served_model_name:
        # the engine's metrics carry model_name = the first served name, as vLLM's and as the
        # front end's series (the CLI sets both; a ServerConfig-only name must reach it too)
        engine_config = dataclasses.replace(engine_config,
                                            served_model_name=config.served_model_name[0])
    state = ServerState(engine_config, config)
    serving = OpenAIServing(state)
    version_body = {"version": package_version()}  # read once: metadata lookup is file I/O

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        owned = engine is None
        if owned:
            from atom_stream.engine.dp import make_async_engine

            eng = make_async_engine(engine_config)  # DPEngine when data_parallel_size > 1
            try:
                await eng.start()
            except Exception as e:
                # one line for the operator (QuietStartupFailure), the traceback at debug level
                app.state.startup_error = (f"atom-stream could not start: "
                                           f"{type(e).__name__}: {e}")
                logger.debug("start-up failure", exc_info=True)
                raise
        else:
            eng = engine
        state.engine = eng
        state.loop = asyncio.get_running_loop()
        logger.info("atom-stream serving %s (max_model_len %d) on http://%s:%d",
                    state.model_names[0], eng.max_model_len, config.host, config.port)
        try:
            yield
        finally:
            if owned:
                await eng.shutdown(drain=True, timeout=config.shutdown_timeout)

    async def health(request: Request) -> Response:
        # vLLM's health(): Response(status_code=200), or 503 on EngineDeadError; empty bodies
        eng = state.engine
        return Response(status_code=503 if eng is None or eng.is_dead else 200)

    async def load(request: Request) -> Response:
        """vLLM's /load: the requests in flight (streams the engine serves now)."""
        eng = state.engine
        n = 0 if eng is None else int(eng.stats().get("num_streams", 0))
        return json_response({"server_load": n})

    async def version(request: Request) -> Response:
        return json_response(version_body)

    tokenization = Tokenization(state)
    anthropic = AnthropicServing(serving)
    responses_api = ResponsesServing(serving)

    async def metrics(request: Request) -> Response:
        eng = state.engine
        registry = eng.metrics.registry if eng is not None else None
        return Response(state.metrics.render(registry), media_type=CONTENT_TYPE)

    async def reset_prefix_cache(request: Request) -> Response:
        """vLLM's POST /reset_prefix_cache (a dev-mode route there): every replica forgets its
        cached prefix blocks, on this loop thread (the engine core's thread). Blocks of running
        requests stay theirs and only stop being shared. 200 with an empty body, as vLLM; the
        API key is required where one is set (it is not under /v1); 503 without an engine."""
        checker = state.key_checker
        if checker and not checker.check_header(request.headers.get("authorization", "")):
            return HTTPError(401, "a valid API key is required", type="AuthenticationError",
                             headers={"WWW-Authenticate": "Bearer"}).response()
        eng = state.engine
        if eng is None or eng.is_dead:
            return Response(status_code=503)
        await eng.reset_prefix_cache()  # DPEngine: every replica
        return Response(status_code=200)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        if status == 404:
            detail = f"no route {request.method} {request.url.path}"
        # starlette's own headers travel on (a 405 names the route's methods in `Allow`)
        err = HTTPError(status, detail, headers=dict(getattr(exc, "headers", None) or {}))
        if request.url.path.startswith("/v1/messages"):
            return anthropic_error_response(err)  # Anthropic's body on its routes
        return err.response()

    routes = [
        Route("/v1/chat/completions", serving.chat_completions, methods=["POST"]),
        Route("/v1/completions", serving.completions, methods=["POST"]),
        Route("/v1/messages", anthropic.messages, methods=["POST"]),
        Route("/v1/responses", responses_api.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses_api.retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses_api.delete, methods=["DELETE"]),
        Route("/v1/messages/count_tokens", anthropic.count_tokens, methods=["POST"]),
        Route("/v1/models", serving.models, methods=["GET"]),
        Route("/v1/models/{model:path}", serving.retrieve_model, methods=["GET"]),
        WebSocketRoute("/v1/ws", WebSocketEndpoint(state)),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET", "POST"]),  # SageMaker's health route (vLLM)
        Route("/invocations", invocations_route({  # SageMaker's inference route (vLLM)
            "/v1/chat/completions": serving.chat_completions,
            "/v1/completions": serving.completions,
            "/v1/responses": responses_api.create}, config.max_body_bytes), methods=["POST"]),
        Route("/load", load, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
        Route("/tokenize", tokenization.tokenize, methods=["POST"]),
        Route("/detokenize", tokenization.detokenize, methods=["POST"]),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                             allow_credentials=config.allow_credentials,
                             allow_methods=config.allowed_methods,
                             allow_headers=config.allowed_headers)]  # first: outermost
    if config.enable_request_id_headers:  # outside auth: a 401 carries the id too
        middleware.append(Middleware(RequestIdHeaderMiddleware))
    if state.key_checker:
        middleware.append(Middleware(APIKeyMiddleware, checker=state.key_checker))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={StarletteHTTPException: http_error})
    app.state.server = state
    return app


# The WebSocket layer's own message cap is at least this: up to it an oversized frame gets an
# `error` frame and the connection goes on (DESIGN.md); beyond it the layer closes the socket
# (1009) without reading the payload. One connection buffers at most this much.
WS_TRANSPORT_FLOOR = 64 << 20


def ws_transport_cap(frame_limit: int) -> int:
    """uvicorn's ws_max_size for a frame limit: twice the limit + 64 KiB, at least
    WS_TRANSPORT_FLOOR (a small configured limit keeps the error-frame answer for any frame a
    client is likely to send)."""
    return max(2 * frame_limit + (64 << 10), WS_TRANSPORT_FLOOR)


def uvicorn_config(app: Starlette, config: ServerConfig) -> Any:
    import uvicorn

    frame = int(config.ws_max_frame_bytes or config.max_body_bytes)
    http = type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"max_head_bytes": int(config.max_header_bytes)})
    return uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop", http=http,
        ws=BatchingWebSocketProtocol, lifespan="on", log_level=config.log_level.lower(),
        access_log=config.access_log, timeout_keep_alive=config.timeout_keep_alive,
        timeout_graceful_shutdown=config.shutdown_timeout,
        # protocol-level cap; frames between ws_max_frame_bytes and this get an error frame
        ws_max_size=ws_transport_cap(frame), ws_ping_interval=config.ws_ping_interval,
        ws_ping_timeout=config.ws_ping_timeout,
        ws_per_message_deflate=False,  # token frames are tiny: compression costs more CPU
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
        ssl_ca_certs=config.ssl_ca_certs, ssl_cert_reqs=config.ssl_cert_reqs,
        root_path=config.root_path,
    )


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head (request line +
    headers): a head larger than `max_head_bytes` gets 431 and the connection is closed.
    Two counts: the parsed request target and headers (a head that completes within a read is
    checked when its headers end, before the app sees it), and the raw reads that lie wholly
    inside a head still open (a head that never ends, or one huge header arriving over many
    reads, is cut off once it passes the limit; httptools buffers a header until it ends).
    Bodies and pipelined requests never count; memory stays within the limit plus one read
    (uvloop reads at most 256 KiB)."""

    max_head_bytes = 64 << 10

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_open = True  # bytes before the first request are its head
        self._head_bytes = 0  # parsed: target + headers of the current request
        self._read_bytes = 0  # raw reads wholly inside the current head
        self._heads = 0  # requests begun on this connection
        self._reject = False  # the current head passed the limit: answer 431

    def data_received(self, data: bytes) -> None:
        was_open, heads = self._head_open, self._heads
        super().data_received(data)
        if self.parser is None or self.transport.is_closing():
            return
        if was_open and self._head_open and heads == self._heads:
            self._read_bytes += len(data)
        if self._reject or self._read_bytes > self.max_head_bytes:
            self.logger.warning("Request headers exceed %d bytes.", self.max_head_bytes)
            body = HTTPError(431, f"request headers exceed {self.max_head_bytes} bytes").body()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open, self._head_bytes, self._read_bytes = True, 0, 0
        self._heads += 1
        self._reject = False

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._head_bytes > self.max_head_bytes:
            self._reject = True  # the app never sees it; data_received answers
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._reject:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._reject:
            super().on_message_complete()


class QuietStartupFailure:
    """ASGI wrapper: a failed start-up (a bad --model, no GPU for --device cuda, ...) is reported
    by uvicorn as the one line the lifespan left in `app.state.startup_error`, not as the
    traceback Starlette puts in the lifespan.startup.failed message."""

    def __init__(self, app: Starlette):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_quietly(message):
            line = getattr(self.app.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and line:
                message = {**message, "message": line}
            await send(message)

        return await self.app(scope, receive, send_quietly)


def run_server(engine_config: EngineConfig, config: ServerConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM (blocking). A failed start-up exits with uvicorn's status 3
    after one error line. The first signal also arms _abort_before_deadline. After a graceful
    SIGTERM shutdown the process exits with status 0 (as `vllm serve`; see
    _sigterm_exits_zero); SIGINT ends in KeyboardInterrupt (the CLI's status 130)."""
    import uvicorn

    config = config or ServerConfig()
    app = build_app(engine_config, config)
    state: ServerState = app.state.server

    class Server(uvicorn.Server):
        armed = False

        def handle_exit(self, sig, frame) -> None:
            if not self.armed and state.loop is not None:
                self.armed = True
                state.loop.call_soon_threadsafe(_abort_before_deadline, state)
            super().handle_exit(sig, frame)

    with _sigterm_exits_zero():
        Server(uvicorn_config(QuietStartupFailure(app), config)).run()


@contextlib.contextmanager
def _sigterm_exits_zero():
    """While serving, SIGTERM's handler outside uvicorn raises SystemExit(0). uvicorn installs
    its own handler for the run (the graceful shutdown), then restores the one it found and
    re-raises the signal it caught into it: with the default handler the process would die
    of SIGTERM (status -15 / 143) after a clean shutdown; with this one it exits 0. A SIGTERM
    before uvicorn starts serving exits 0 at once. Main thread only (signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_zero(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, exit_zero)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _abort_before_deadline(state: ServerState) -> None:
    """On the loop: abort every live request a little before --shutdown-timeout runs out, so
    each open SSE stream ends properly (an error event "server shutting down", then [DONE])
    and each WebSocket request with its 503 error frame (then the socket closes with 1001),
    instead of being cut when uvicorn cancels the handlers at the deadline."""
    loop, engine = state.loop, state.engine
    if loop is None or engine is None or not hasattr(engine, "abort_all"):
        return
    delay = shutdown_abort_delay(state.config.shutdown_timeout)

    def fire() -> None:
        state.deadline_abort = loop.create_task(engine.abort_all())  # referenced: not GC'd

    loop.call_later(delay, fire)
