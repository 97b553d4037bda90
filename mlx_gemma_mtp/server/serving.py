"""The generation path every API shares, below the translators.

`receive` reads a body (bounded: 413), waits for the engine and parses it; `generate` checks a
`GenerateRequest`, templates and encodes its prompt off the event loop, queues it and waits until
the engine took it. A `Generation` then gives the reply whole (`whole`) or as events (`events`):
("text", str, log-probability entries), ("tool_call", {"id", "name", "arguments"}), ("end",
reason, usage, stop string or None) and ("error", APIError). Stop strings are applied in the engine thread
(`server.text.TextStream`), tool calls are split out of the text here, once for every API.
"""

import asyncio
import json
import time
from typing import AsyncIterator, Optional

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mlx_gemma_mtp.server.errors import APIError, shutting_down, too_large
from mlx_gemma_mtp.server.jobs import Job
from mlx_gemma_mtp.server.protocol import GenerateRequest, Result
from mlx_gemma_mtp.server.requests import Server
from mlx_gemma_mtp.server.text import ToolCallSplitter

DISCONNECT_POLL = 0.5  # seconds between checks for a gone client while a non-streamed reply waits
READY_POLL = 0.05  # seconds between looks at the engine thread while it loads
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- reading requests ----------------------------------------------------------------------------


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


async def until_ready(server: Server, http: HTTPRequest) -> bool:
    """Wait while the engine thread loads and warms up (False: the client left meanwhile)."""
    worker, waited = server.worker, 0.0
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


async def receive(server: Server, http: HTTPRequest, model):
    """The request's body as `model` once the engine is ready (None: the client left)."""
    if server.worker.closing:
        raise shutting_down()
    raw = await read_body(http, server.max_body_bytes)  # read first: a disconnect check would eat it
    if not await until_ready(server, http):
        return None
    return await server.parse(raw, model)


def gone() -> JSONResponse:
    """What a client that closed its request is answered (nobody reads it)."""
    return JSONResponse({"error": {"message": "client closed the request", "type": "invalid_request_error",
                                   "param": None, "code": None}}, status_code=499)


def sse(data, event: Optional[str] = None) -> str:
    """One server-sent event (Responses and Messages name theirs; chat completions do not)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- running a request ---------------------------------------------------------------------------


async def next_item(job: Job, server: Server, http: HTTPRequest) -> Optional[tuple]:
    """The job's next item; None (and the job cancelled) when the client has gone, which is
    checked every DISCONNECT_POLL seconds even while items keep coming."""
    worker, now = server.worker, time.monotonic()
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


def splitter_for(server: Server, req: GenerateRequest) -> ToolCallSplitter:
    tok = server.tokenizer
    if req.tools is not None and tok.has_tool_calling:
        return ToolCallSplitter(tok.tool_call_start, tok.tool_call_end, tok.tool_parser, req.tools)
    return ToolCallSplitter(None, None, None)


def neutral_calls(calls: list) -> list:
    """The splitter's OpenAI tool calls as {"id", "name", "arguments" (a JSON string)}."""
    return [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]


class Generation:
    """One request the engine has taken: its prompt's size, and its reply whole or as events."""

    def __init__(self, server: Server, req: GenerateRequest, job: Job, cached_tokens: int):
        self.server, self.req, self.job = server, req, job
        self.prompt_tokens, self.cached_tokens = len(job.ids), cached_tokens

    async def whole(self, http: HTTPRequest) -> Optional[Result]:
        """The reply once complete (None: the client went away)."""
        item = await next_item(self.job, self.server, http)
        if item is None:
            return None
        if item[0] == "error":
            raise item[1]
        _, reason, usage = item  # "end": the engine thread kept the text (Job.add) and is done with the job
        splitter = splitter_for(self.server, self.req)
        parts = splitter.feed("".join(t for t, _ in self.job.held)) + splitter.finish()
        text = "".join(p for kind, p in parts if kind == "content")
        calls = neutral_calls([c for kind, p in parts if kind == "tool_calls" for c in p])
        if calls and reason == "stop":
            reason = "tool_calls"
        entries = [e for _, es in self.job.held for e in es]
        return Result(text, calls, entries, reason, usage, self.stop_sequence(reason))

    def stop_sequence(self, reason: str) -> Optional[str]:
        # read once the engine thread has ended the row (its "end" item came after it was set)
        return self.job.text.matched if reason == "stop" and self.job.text is not None else None

    async def events(self) -> AsyncIterator[tuple]:
        """The reply as it comes; the row leaves the batch when the consumer stops early."""
        splitter, called, job = splitter_for(self.server, self.req), False, self.job
        try:
            while True:
                item = await job.queue.get()
                if item[0] == "error":
                    yield item
                    return
                if item[0] == "delta":
                    parts, entries = splitter.feed(item[1]), item[2]
                else:
                    parts, entries = splitter.finish(), []
                for kind, value in parts:
                    if kind == "content":
                        yield ("text", value, entries)
                        entries = []
                    else:
                        called = True
                        for call in neutral_calls(value):
                            yield ("tool_call", call)
                if entries:  # log-probabilities of tokens whose text is held back
                    yield ("text", "", entries)
                if item[0] == "end":
                    _, reason, usage = item
                    if called and reason == "stop":
                        reason = "tool_calls"
                    yield ("end", reason, usage, self.stop_sequence(reason))
                    return
        finally:
            self.server.worker.cancel(job)  # a no-op once it finished; a client that left stops its row
            # A client that leaves cancels the stream's generator, and anyio keeps the
            # CancelledError in a reference cycle with its traceback, which holds this frame:
            # without this the job (and its KV cache) stayed in memory until Python's cycle
            # collector next ran.
            del job
            self.job = None


async def generate(server: Server, http: HTTPRequest, req: GenerateRequest) -> Optional[Generation]:
    """Check, encode and queue the request; -> its Generation once the engine took it (None: the
    client went away)."""
    settings = server.check(req)
    ids, images = await run_in_threadpool(server.prompt_ids, req)
    grammar = await run_in_threadpool(server.structured, req)
    job = server.job(req, ids, settings, grammar, images)
    server.worker.submit(job)
    item = await next_item(job, server, http)
    if item is None:
        return None
    if item[0] == "error":
        raise item[1]
    return Generation(server, req, job, item[1])
