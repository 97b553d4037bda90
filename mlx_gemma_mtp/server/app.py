"""`gemma-mtp serve`: an OpenAI-compatible HTTP server, MTP decoding under continuous batching.

The event loop (uvicorn, FastAPI) reads request bodies (at most `max_body_bytes`, else 413), checks
requests and formats responses: OpenAI JSON or server-sent events, tool calls split out of the text
(`server.text`). The CPU work of a request (parsing a large body, rendering the chat template,
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
import json
import logging
import socket
import time
import uuid
from typing import Callable, Optional

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.server.errors import APIError, bad, shutting_down, too_large, validation_error
from mlx_gemma_mtp.server.jobs import Job
from mlx_gemma_mtp.server.images import ImagePolicy
from mlx_gemma_mtp.server.requests import MAX_BODY_BYTES, Server
from mlx_gemma_mtp.server.schema import ChatCompletionRequest, CompletionRequest
from mlx_gemma_mtp.server.text import ToolCallSplitter, chat_logprobs, completion_logprobs, split_tool_calls
from mlx_gemma_mtp.server.worker import Worker

log = logging.getLogger("mlx_gemma_mtp.server")

DISCONNECT_POLL = 0.5  # seconds between checks for a gone client while a non-streamed reply waits
READY_POLL = 0.05  # seconds between looks at the engine thread while it loads
SHUTDOWN_GRACE = 10.0  # --shutdown-grace's default: seconds running rows get to finish on SIGTERM
FLUSH_SECONDS = 5.0  # after the grace: for the last events to reach the clients before uvicorn cancels


# --- responses -----------------------------------------------------------------------------------


async def next_item(job: Job, worker: Worker, http: HTTPRequest) -> Optional[tuple]:
    """The job's next item; None (and the job cancelled) when the client has gone, which is
    checked every DISCONNECT_POLL seconds even while items keep coming."""
    now = time.monotonic()
    if now - job.checked >= DISCONNECT_POLL:
        job.checked = now
        if await http.is_disconnected():
            worker.cancel(job)
            return None
    task = asyncio.ensure_future(job.queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done:
                return task.result()
            job.checked = time.monotonic()
            if await http.is_disconnected():
                worker.cancel(job)
                return None
    finally:
        if not task.done():
            task.cancel()


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    """The request's body, refused with 413 past `limit` bytes: by its Content-Length before a byte
    is read, and by counting while it arrives (a chunked body has no length)."""
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def create_app(server: "Server", allow_origins: tuple = ()) -> FastAPI:
    from fastapi.middleware.cors import CORSMiddleware

    app = FastAPI(title="gemma-mtp", description="Gemma 4 with MTP speculative decoding, OpenAI-compatible")
    app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    worker = server.worker

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") in ("json_invalid", "json_type") for e in errors):
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        return validation_error(errors).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

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

    async def until_ready(http: HTTPRequest) -> bool:
        """Wait while the engine thread loads and warms up (False: the client left meanwhile)."""
        waited = 0.0
        while not worker.ready.is_set() and not worker.closing:
            await asyncio.sleep(READY_POLL)
            waited += READY_POLL
            if waited >= DISCONNECT_POLL:
                waited = 0.0
                if await http.is_disconnected():
                    return False
        if worker.closing:
            raise shutting_down()
        if worker.state != "ok":
            raise APIError(503, "the engine is not running", code="engine_stopped")
        return True

    async def receive(http: HTTPRequest, model):
        """The request's body as `model` once the engine is ready (None: the client left)."""
        if worker.closing:
            raise shutting_down()
        raw = await read_body(http, server.max_body_bytes)  # read first: a disconnect check would eat it
        if not await until_ready(http):
            return None
        return await server.parse(raw, model)

    async def start(job: Job, http: HTTPRequest) -> Optional[int]:
        """Queue the job and wait until the engine took it: -> cached prompt tokens (None: gone)."""
        worker.submit(job)
        item = await next_item(job, worker, http)
        if item is None:
            return None
        if item[0] == "error":
            raise item[1]
        return item[1]

    async def collect(job: Job, http: HTTPRequest):
        item = await next_item(job, worker, http)
        if item is None:
            return None
        if item[0] == "error":
            raise item[1]
        # "end": the engine thread kept the text (Job.add) and is done with the job
        return "".join(t for t, _ in job.held), [e for _, es in job.held for e in es], item[1], item[2]

    async def begin(job: Job, http: HTTPRequest, stream: bool):
        """Queue the job; for a whole (not streamed) reply, wait for all of it. None: the client
        went away."""
        if await start(job, http) is None:
            return None
        return True if stream else await collect(job, http)

    def gone():
        return JSONResponse({"error": {"message": "client closed the request", "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=499)

    # The bodies are read and parsed by hand (not as FastAPI body parameters): bounded in size,
    # parsed off the event loop when large, and JSON whatever the Content-Type, as OpenAI takes it.
    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await receive(http, ChatCompletionRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise bad("response_format other than text is not supported", "response_format", "unsupported_value")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        settings = server.check(body, max_tokens, top)
        ids, tools, images = await run_in_threadpool(server.chat_ids, body)
        job = server.job(body, ids, settings, top, images)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": server.model_id}
        tok = server.tokenizer
        use_tools = tools is not None and tok.has_tool_calling
        result = await begin(job, http, body.stream)
        if result is None:
            return gone()

        if not body.stream:
            text, entries, reason, usage = result
            message = {"role": "assistant", "content": text}
            if use_tools:
                content, calls = split_tool_calls(text, tok, tools)
                message["content"] = content
                if calls:
                    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
                    reason = "tool_calls" if reason == "stop" else reason
            choice = {"index": 0, "message": message, "logprobs": {"content": chat_logprobs(entries)} if top is not None
                      else None, "finish_reason": reason}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        splitter = ToolCallSplitter(tok.tool_call_start, tok.tool_call_end, tok.tool_parser, tools) if use_tools \
            else ToolCallSplitter(None, None, None)

        def chunk(delta, logprobs=None, reason=None):
            out = {**base, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
            if include_usage:
                out["usage"] = None
            return out

        def deltas(parts, entries):
            out = []
            for kind, value in parts:
                out.append({"content": value} if kind == "content" else {"tool_calls": value})
            if entries and not out:
                out.append({"content": ""})
            return [chunk(d, {"content": chat_logprobs(entries)} if entries and i == 0 else None)
                    for i, d in enumerate(out)]

        async def events(job):
            called = False
            try:
                yield sse(chunk({"role": "assistant", "content": ""}))
                while True:
                    item = await job.queue.get()
                    if item[0] == "delta":
                        parts = splitter.feed(item[1])
                        called = called or any(k == "tool_calls" for k, _ in parts)
                        for c in deltas(parts, item[2] if top is not None else []):
                            yield sse(c)
                    elif item[0] == "error":
                        yield sse(item[1].body())
                        break
                    else:
                        _, reason, usage = item
                        parts = splitter.finish()
                        called = called or any(k == "tool_calls" for k, _ in parts)
                        for c in deltas(parts, []):
                            yield sse(c)
                        yield sse(chunk({}, None, "tool_calls" if called and reason == "stop" else reason))
                        if include_usage:
                            yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                        break
                yield "data: [DONE]\n\n"
            finally:
                worker.cancel(job)  # a no-op once it finished; a client that left stops its row
                # A client that leaves cancels this generator, and anyio keeps the CancelledError
                # in a reference cycle with its traceback, which holds this frame: without this
                # the job (and a KV cache of its own, 1.4 MB on the demo pair) stayed in memory
                # until Python's cycle collector next ran.
                del job

        return StreamingResponse(events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await receive(http, CompletionRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        if body.echo:
            raise bad("echo is not supported", "echo", "unsupported_value")
        if body.suffix:
            raise bad("suffix is not supported", "suffix", "unsupported_value")
        if body.best_of not in (None, 1):
            raise bad("best_of > 1 is not supported", "best_of", "unsupported_value")
        settings = server.check(body, body.max_tokens, body.logprobs)
        ids = await run_in_threadpool(server.completion_ids, body)
        job = server.job(body, ids, settings, body.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_id}
        want_lp = body.logprobs is not None
        result = await begin(job, http, body.stream)
        if result is None:
            return gone()

        if not body.stream:
            text, entries, reason, usage = result
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(entries, 0) if want_lp else None,
                      "finish_reason": reason}
            return {**base, "choices": [choice], "usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text, logprobs=None, reason=None):
            out = {**base, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
            if include_usage:
                out["usage"] = None
            return out

        async def events(job):
            offset = 0
            try:
                while True:
                    item = await job.queue.get()
                    if item[0] == "delta":
                        yield sse(chunk(item[1], completion_logprobs(item[2], offset) if want_lp else None))
                        offset += len(item[1])
                    elif item[0] == "error":
                        yield sse(item[1].body())
                        break
                    else:
                        yield sse(chunk("", None, item[1]))
                        if include_usage:
                            yield sse({**base, "choices": [], "usage": item[2]})
                        break
                yield "data: [DONE]\n\n"
            finally:
                worker.cancel(job)
                del job  # as in the chat stream above

        return StreamingResponse(events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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
