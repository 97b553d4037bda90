"""`gemma-mtp serve`: an OpenAI- and Anthropic-compatible HTTP server, MTP decoding under continuous batching.

The event loop (uvicorn, FastAPI) reads request bodies (at most `max_body_bytes`, else 413), checks
requests and formats responses. Each API is a thin translator onto one internal request
(`server.protocol`) and the shared generation path (`server.serving`): OpenAI's chat completions and
completions (`server.openai_chat`), Responses (`server.responses`) and Anthropic's Messages
(`server.messages`), each with its own JSON, event stream and error shape. The CPU work of a request (parsing a large body, rendering the chat template,
encoding the prompt: `server.requests`) runs in a worker thread with a tokenizer of its own, so
that one huge request stalls neither the streams nor /health. Generation runs in the engine thread
(`server.worker`).

A client that goes away is removed from the batch before the next round. Requests beyond
`max_batch` wait in a queue of at most `max_queue`; past that the answer is 429 with a Retry-After
estimated from the rows running, the queue and the recent time per token.

Life cycle: the port is bound first (a port in use fails before anything loads); the HTTP server
answers while the engine thread loads the pair and warms up (/health: 503 "loading"; requests wait
until it is ready). On SIGTERM (uvicorn's graceful shutdown) new requests get 503, queued ones 503,
running rows get `shutdown_grace` seconds to finish, and what still runs then ends with an error
(an error event and [DONE] in a stream, a 503 body otherwise).

Under `mlx.launch` this runs on rank 0; the other ranks follow it (`server.group`).
"""

import asyncio
import logging
import socket
from typing import Callable, Optional

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.server import messages, openai_chat, responses
from mlx_gemma_mtp.server.errors import APIError, validation_error
from mlx_gemma_mtp.server.images import ImagePolicy
from mlx_gemma_mtp.server.requests import MAX_BODY_BYTES, Server
from mlx_gemma_mtp.server.serving import READY_POLL
from mlx_gemma_mtp.server.worker import Worker

log = logging.getLogger("mlx_gemma_mtp.server")

SHUTDOWN_GRACE = 10.0  # --shutdown-grace's default: seconds running rows get to finish on SIGTERM
FLUSH_SECONDS = 5.0  # after the grace: for the last events to reach the clients before uvicorn cancels
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def error_response(http: HTTPRequest, exc: APIError) -> JSONResponse:
    """An error in the shape of the API the request came in by (Anthropic's under /v1/messages)."""
    if http.url.path.startswith(messages.PREFIX):
        return messages.error_response(exc)
    return exc.response()


def create_app(server: "Server", allow_origins: tuple = ()) -> FastAPI:
    from fastapi.middleware.cors import CORSMiddleware

    app = FastAPI(title="gemma-mtp", description="Gemma 4 with MTP speculative decoding, OpenAI-compatible")
    app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"])
    worker = server.worker

    @app.exception_handler(APIError)
    async def api_error(http, exc: APIError):
        return error_response(http, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(http, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") in ("json_invalid", "json_type") for e in errors):
            return error_response(http, APIError(400, "the request body is not valid JSON", code="invalid_json"))
        return error_response(http, validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return error_response(http, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def unexpected(http, exc: Exception):
        log.exception("unexpected error")
        return error_response(http, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        state = worker.state
        body = {"status": state, "model": server.model_id, **worker.status()}
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    def model_card():
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "mlx-gemma-mtp"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

    # one translator per API, over the shared generation path (server.serving)
    openai_chat.register(app, server)
    responses.register(app, server)
    messages.register(app, server)
    return app


# --- running it ----------------------------------------------------------------------------------


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before anything loads: a port in use fails at once, with one
    line, instead of after the model has loaded (uvicorn listens on it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds one
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a restart while old connections linger)
        sock.bind((host, port))
    except OSError as e:  # in use, not this machine's address, an unknown name
        sock.close()
        raise MTPError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class HTTPServer(uvicorn.Server):
    """uvicorn's server, with the engine thread's life cycle: `on_ready(worker)` once it has loaded
    and warmed up (the server stops if loading failed), and on shutdown (SIGTERM, Ctrl-C) the
    engine stops taking requests and gives running rows `grace` seconds."""

    def __init__(self, config: uvicorn.Config, worker: Worker, grace: float, on_ready: Optional[Callable]):
        super().__init__(config)
        self.worker, self.grace, self.on_ready = worker, grace, on_ready
        self.announcing = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.announcing = asyncio.get_running_loop().create_task(self.announce())

    async def announce(self) -> None:
        while not self.worker.ready.is_set():
            await asyncio.sleep(READY_POLL)
        if self.worker.load_error is not None:
            self.should_exit = True  # serve() raises it
        elif self.on_ready is not None:
            self.on_ready(self.worker)

    async def shutdown(self, sockets=None) -> None:
        self.worker.close(self.grace)
        await super().shutdown(sockets)


def serve(loader: Callable, model_id: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8,
          num_draft_tokens="adaptive", max_queue: int = 64, prompt_cache_bytes: int = 2 << 30,
          default_max_tokens: int = 512, log_level: str = "info", on_ready: Optional[Callable] = None,
          cache_options: Optional[dict] = None, allow_origins: tuple = (), max_body_bytes: int = MAX_BODY_BYTES,
          shutdown_grace: float = SHUTDOWN_GRACE, image_policy: Optional[ImagePolicy] = None) -> None:
    """Bind host:port, load the pair in the engine thread and warm it up while the HTTP server
    answers (/health: 503 "loading"), call `on_ready(worker)`, and serve until interrupted.
    `cache_options`: kv_bits, kv_group_size, quantized_kv_start, prefill_step_size (see
    api.stream_generate). `max_body_bytes`: the largest request body (413 beyond it).
    `shutdown_grace`: seconds running rows get to finish on SIGTERM. `image_policy`: what
    image_url parts may name (server/images.py)."""
    from mlx_gemma_mtp.model.sharding import launched

    sock = listening_socket(host, port)
    worker = Worker(loader, num_draft_tokens, max_batch, max_queue, prompt_cache_bytes, cache_options, warm_up=True)
    worker.start()
    app = create_app(Server(worker, model_id, default_max_tokens, max_body_bytes, image_policy or ImagePolicy()),
                     allow_origins)
    config = uvicorn.Config(app, host=host, port=port, http="h11", log_level=log_level,
                            timeout_graceful_shutdown=shutdown_grace + FLUSH_SECONDS)
    server = HTTPServer(config, worker, shutdown_grace, on_ready)
    if launched():  # under mlx.launch: SIGTERM must reach the code that tells the other ranks to stop
        from mlx_gemma_mtp.server.group import exit_on_sigterm

        exit_on_sigterm()
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        worker.join(timeout=5)
        sock.close()
        if worker.failed:
            raise MTPError(f"the processes stopped: {worker.failed}")
    if worker.load_error is not None:
        raise worker.load_error
