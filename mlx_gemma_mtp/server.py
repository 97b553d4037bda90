"""`gemma-mtp serve`: an OpenAI-compatible HTTP server, MTP decoding under continuous batching.

This module owns the errors (answered in OpenAI's shape), the engine thread and the HTTP app. Beside
it: `serve_text` (a row's tokens as response text), `prompt_pool` (the prompt cache pool) and
`serve_requests` (request checking, templating, `Server`).

Threads:
- The engine thread owns MLX: it loads the pair, runs `engine.Engine` and is the only thread that
  calls MLX. Requests reach it through a thread-safe inbox ("submit", "cancel"); between two rounds
  it admits waiting requests (at most `max_batch` rows decode at once), removes cancelled ones,
  runs one `Engine.step()` and turns each row's tokens into text (`serve_text.TextStream`). What a
  request receives goes to its own asyncio queue through `loop.call_soon_threadsafe`: each round's
  text for a stream; for a reply sent whole, only its end (the text waits in the job). A finished
  row's KV cache goes back to the prompt cache pool (`prompt_pool`).
- The event loop (uvicorn, FastAPI) reads request bodies (at most `max_body_bytes`, else 413),
  checks requests and formats responses: OpenAI JSON or server-sent events, tool calls split out of
  the text (`serve_text`). The CPU work of a request (parsing a large body, rendering the chat
  template, encoding the prompt: `serve_requests`) runs in a worker thread with a tokenizer of its
  own, so that one huge request stalls neither the streams nor /health.

A client that goes away is removed from the batch before the next round. Requests beyond
`max_batch` wait in a queue of at most `max_queue`; past that the answer is 429 with a Retry-After
estimated from the rows running, the queue and the recent time per token.

Life cycle: the port is bound first (a port in use fails before anything loads); the HTTP server
answers while the engine thread loads the pair and warms up (/health: 503 "loading"; requests wait
until it is ready). On SIGTERM (uvicorn's graceful shutdown) new requests get 503, queued ones 503,
running rows get `shutdown_grace` seconds to finish, and what still runs then ends with an error
(an error event and [DONE] in a stream, a 503 body otherwise).

Under `mlx.launch` (the target split over processes) this runs on rank 0, and the engine thread's
operations go to every rank through `serve_group`.
"""

import asyncio
import copy
import heapq
import json
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import MTPError
from .openai_schema import ChatCompletionRequest, CompletionRequest
from .prompt_pool import PromptCachePool
from .detokenize import IncrementalDecoder
from .housekeeping import keep_weights_wired, release_cache
from .serve_text import TextStream, ToolCallSplitter, chat_logprobs, completion_logprobs, split_tool_calls

if TYPE_CHECKING:  # serve_requests imports this module (its errors, Job, Worker)
    from .serve_requests import Server

log = logging.getLogger("mlx_gemma_mtp.server")

PENALTY_CONTEXT = 20  # tokens presence/frequency penalties look back over (mlx-lm's default)
DISCONNECT_POLL = 0.5  # seconds between checks for a gone client while a non-streamed reply waits
READY_POLL = 0.05  # seconds between looks at the engine thread while it loads
MAX_BODY_BYTES = 16 << 20  # --max-body-bytes' default
SHUTDOWN_GRACE = 10.0  # --shutdown-grace's default: seconds running rows get to finish on SIGTERM
FLUSH_SECONDS = 5.0  # after the grace: for the last events to reach the clients before uvicorn cancels
TOKEN_SECONDS_GUESS = 0.05  # Retry-After's seconds per generated token of a row, until a request has finished
# Retry-After's bounds (clients give up on long waits: OpenAI's past two minutes), and its margin: a
# client that comes back a little late waits a moment in the queue, one that comes back early is
# refused again (and rows of one length finish together, right at the estimate)
MIN_RETRY_AFTER, MAX_RETRY_AFTER, RETRY_MARGIN = 0.25, 60.0, 1.25
WARM_UP_TOKENS = 24  # tokens per warm-up row: enough rounds for each decode forward to be compiled (HOT_SHAPE)
STATM = "/proc/self/statm"  # Linux's current resident memory (macOS has no /proc)


# --- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down")


def retry_headers(seconds: float) -> dict:
    """Retry-After in whole seconds (HTTP's), and in milliseconds as OpenAI's clients read it first."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}


# --- memory --------------------------------------------------------------------------------------


def resident_bytes() -> Optional[int]:
    """The process's resident memory: now, from /proc (Linux); else its peak, from getrusage
    (kilobytes on Linux, bytes on macOS); None where neither exists (Windows)."""
    try:
        with open(STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- jobs and the engine thread ------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request on its way through the engine thread."""

    ids: list
    request: Any  # engine.Request, built MLX-free on the event loop
    stops: list
    top_logprobs: Optional[int]  # None: no log-probabilities
    processors: dict  # logit_bias / presence / frequency penalty, built into processors in the engine thread
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    uid: Optional[int] = None
    stats: Any = None
    text: Optional[TextStream] = None
    cancelled: bool = False
    done: bool = False
    checked: float = field(default_factory=time.monotonic)  # when the client was last seen connected
    settings: dict = field(default_factory=dict)  # make_request's arguments, which other ranks rebuild it from
    # a reply sent whole (not streamed): its text is kept here, not sent round by round, so the
    # event loop is woken only when the reply is complete
    whole: bool = False
    held: list = field(default_factory=list)  # (text, logprob entries) per round
    admitted: float = 0.0  # when the engine thread took it from the queue (time.monotonic)

    def add(self, text: str, entries: list) -> None:
        """A round's new text: sent at once when streamed, kept when the reply goes whole."""
        if self.whole:
            self.held.append((text, entries))
        else:
            self.send(("delta", text, entries))

    def send(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is going down
            pass


class Worker(threading.Thread):
    """The engine thread. `loader()` -> (pair, tokenizer) runs in it, so MLX lives in one thread.
    `ready` is set once the pair is loaded and warmed up (`warm_up`), or failed to (`load_error`)."""

    def __init__(self, loader: Callable, num_draft_tokens="adaptive", max_batch: int = 8, max_queue: int = 64,
                 prompt_cache_bytes: int = 2 << 30, cache_options: Optional[dict] = None, warm_up: bool = False):
        super().__init__(name="gemma-mtp-engine", daemon=True)
        # kv_bits, kv_group_size, quantized_kv_start, prefill_step_size: the API's, for every request
        self.cache_options = cache_options or {}
        self.loader, self.setting = loader, num_draft_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pool = PromptCachePool(prompt_cache_bytes)
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # guards `queued` and `promised`
        self.queued = 0  # submitted, not yet admitted
        self.promised: deque = deque()  # (when, max_tokens) of clients refused with 429 and told to come back
        self.token_seconds: Optional[float] = None  # recent seconds per generated token of a row (a moving average)
        self.tokenizer_lock = threading.Lock()  # guards `tokenizer` (the engine thread's)
        # the request side's own copy of the tokenizer (templating and encoding in worker threads):
        # a long encode under `tokenizer_lock` would stall the engine thread's detokenizing
        self.encoder = None
        self.encoder_lock = threading.Lock()
        self.warm_up, self.warm_up_seconds = warm_up, None
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.stopping = False
        self.closing = False  # SIGTERM: no new requests; running rows end at `deadline`
        self.deadline: Optional[float] = None
        self.pair = self.tokenizer = self.engine = None
        self.waiting: deque = deque()
        self.active: dict = {}  # uid -> Job
        self._token_text: dict = {}
        self.group = None  # serve_group.Leader when the target is split over mlx.launch's processes
        self.failed: Optional[str] = None  # why the group stopped (serve_group)

    # --- called from other threads ---

    def submit(self, job: Job) -> None:
        if self.closing:
            raise shutting_down()
        with self.lock:
            room = self._room()
            if self.queued >= room:
                raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting",
                               code="rate_limit_exceeded", kind="rate_limit_error",
                               headers=retry_headers(self._come_back_in(job, room)))
            self.queued += 1
        self.inbox.put(("submit", job))

    def _room(self) -> int:
        """Requests that may be submitted and not yet admitted: the queue, and the batch's free
        rows (requests arriving together at an idle server pass through the queue at once)."""
        return self.max_queue + max(self.max_batch - len(self.active), 0)

    def _come_back_in(self, job: Job, room: int) -> float:
        """Seconds until the queue has room for `job`, refused now (under `lock`), if every row runs
        to its max_tokens at the recent time per token: the running rows free their places as they
        finish, and the requests ahead (queued, then the clients told to come back before this one)
        take them in turn. The promise is kept, so that a flood of clients is told to come back one
        after another, not all at once; the running rows' progress corrects a guess that was short."""
        now = time.monotonic()
        while self.promised and self.promised[0][0] <= now:
            self.promised.popleft()
        running = [j for j in list(self.active.values()) if j.text is not None]
        per_token = self._token_seconds(running, now)
        own = job.settings.get("max_tokens", 0)
        free = [max(j.settings.get("max_tokens", 0) - j.text.count, 0) * per_token for j in running]
        free += [0.0] * max(self.max_batch - len(free), 0)
        heapq.heapify(free)
        waiting = [j.settings.get("max_tokens", own) for j in list(self.waiting)]
        ahead = waiting + [own] * max(self.queued - len(waiting), 0) + [tokens for _, tokens in self.promised]
        starts = []  # when each request ahead takes a row
        for tokens in ahead:
            starts.append(heapq.heappop(free))
            heapq.heappush(free, starts[-1] + tokens * per_token)
        fits = len(ahead) - self.max_queue  # the queue has room once this many more have started
        seconds = starts[fits] if 0 <= fits < len(starts) else free[0] if fits >= 0 else 0.0
        seconds = min(max(seconds * RETRY_MARGIN, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
        self.promised.append((now + seconds, own))
        return seconds

    def _token_seconds(self, running: list, now: float) -> float:
        """Seconds per generated token of a row: the finished rows' average, or the running rows'
        pace where it is slower (a fuller batch than the average was measured at)."""
        pace = [(now - j.admitted) / j.text.count for j in running if j.text.count >= 4]
        recent = self.token_seconds or TOKEN_SECONDS_GUESS
        return max(recent, sum(pace) / len(pace)) if pace else recent

    def cancel(self, job: Job) -> None:
        if not job.done:
            job.cancelled = True
            self.inbox.put(("cancel", job))

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(("stop", None))

    def close(self, grace: float) -> None:
        """Stop taking requests (503); queued ones get 503 now, rows still running after `grace`
        seconds end with an error."""
        self.closing = True
        self.inbox.put(("close", time.monotonic() + grace))

    @property
    def state(self) -> str:
        """What /health reports; only "ok" serves."""
        if self.closing:
            return "shutting down"
        if not self.ready.is_set():
            return "loading"
        return "ok" if self.load_error is None and self.is_alive() else "engine stopped"

    @property
    def draft_tokens(self):
        """The server-wide draft length (0 without a drafter)."""
        return self.setting if self.pair is not None and self.pair.drafter is not None else 0

    def status(self) -> dict:
        import mlx.core as mx  # a read of the allocator's counters, safe from any thread

        out = {"running": len(self.active), "waiting": self.queued, "prompt_cache_entries": len(self.pool.entries),
               "prompt_cache_bytes": self.pool.bytes, "mlx_active_bytes": mx.get_active_memory()}
        rss = resident_bytes()
        if rss is not None:
            out["resident_bytes"] = rss
        if self.warm_up_seconds is not None:
            out["warm_up_seconds"] = round(self.warm_up_seconds, 3)
        return out

    # --- the engine thread ---

    def run(self) -> None:
        try:
            self._run()
        finally:
            self._end_thread()

    def _run(self) -> None:
        try:
            self.pair, self.tokenizer = self.loader()
            self.encoder = own_copy(self.tokenizer)
            if self.encoder is None:  # it cannot be copied: the request side shares the engine's
                self.encoder, self.encoder_lock = self.tokenizer, self.tokenizer_lock
            self.engine = self._new_engine()
            if self.pair.group is not None:
                from .serve_group import Leader

                self.group = Leader(self)
            elif self.warm_up and not self.stopping:
                # (under a group a forward needs every rank, and they follow only the Leader's rounds)
                self._warm_up()
        except BaseException as e:  # reported by the main thread
            self.load_error = e
            self.ready.set()
            return
        keep_weights_wired()
        self.ready.set()
        released = False  # the warm-up's buffers go back once the loop first falls idle
        while not self.stopping:
            try:
                idle = not self.active and not self.waiting and not self._pending()
                if idle and not released:
                    release_cache()  # what finished requests held goes back to the system, not MLX's pool
                    released = True
                self._drain(block=idle)
                self._admit()
                if self.active or self._pending():
                    self._step()
                    released = False
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._cut_short()
            except Exception as e:  # a bug in the loop itself: fail what runs, start afresh
                log.exception("engine loop failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        if self.group is not None:
            self.group.close()

    def _warm_up(self) -> None:
        """Run each path a request takes once before serving: prefill, drafted rounds (and plain
        ones), greedy and sampled rows, log-probabilities, one row and two at once. The first use
        of each compiles kernels and graphs (a first request took 73 s on a Mac), which would
        otherwise fall on the first clients while /health said ok."""
        from .api import _engine, make_request

        start = time.perf_counter()
        prompt = list(self.tokenizer.encode("def main():\n    for item in items:")) or [0]

        def row(temperature: float, logprobs: Optional[int] = None):
            request = make_request(self.pair, self.tokenizer, len(prompt), WARM_UP_TOKENS,
                                   temperature=temperature, seed=0)
            request.eos_ids, request.logprobs = frozenset(), logprobs  # every token is generated
            return request

        engines = [self.engine]
        if self.draft_tokens != 0:  # a plain round (K = 0): the target's one-token forward
            engines.append(_engine(self.pair, 0, **self.cache_options))
        for engine in engines:
            for batch in ([row(0.0)], [row(0.0), row(0.8, logprobs=2)]):
                for request in batch:
                    engine.insert(prompt, request)
                while engine.busy:
                    engine.step()
        self.warm_up_seconds = time.perf_counter() - start
        log.info("warmed up in %.1f s", self.warm_up_seconds)

    def _cut_short(self) -> None:
        """The shutdown grace has passed: end the rows still running (an error, 503)."""
        for job in list(self.active.values()):
            self._remove(job.uid)
            self._retire(job)
            self._end(job, ("error", APIError(503, "the server is shutting down: the reply was cut short",
                                              code="server_shutting_down")))
        self.deadline = None

    def _end_thread(self) -> None:
        """Free this thread's MLX state while Python still runs. MLX frees a thread's compiled
        graphs and streams when the thread ends, taking the GIL; once the main thread has begun
        finalizing (it returns from `join` before this thread's exit is done), that aborts the
        process ("terminate called without an active exception")."""
        import mlx.core as mx

        mx.clear_streams()

    def _new_engine(self):
        from .api import _engine

        return _engine(self.pair, self.draft_tokens, **self.cache_options)

    # Engine operations happen at once in a single process; under a group, `self.group` sends
    # them to every rank and they are applied there and here at the same step (serve_group).

    def _remove(self, uid: int) -> None:
        if self.group is None:
            self.engine.remove(uid)
        else:
            self.group.remove(uid)

    def _round(self) -> list:
        return self.engine.step() if self.group is None else self.group.round()

    def _pending(self) -> bool:
        """Whether the group has operations on their way (rounds must run to deliver them)."""
        return self.group is not None and self.group.pending

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.25) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = item
            if kind == "submit":
                self.waiting.append(job)
                if self.closing:
                    self._refuse_waiting()
            elif kind == "close":
                self.deadline = job  # the message carries the grace's end
                self._refuse_waiting()
            elif kind == "cancel" and job.uid is not None and job.uid in self.active:
                self._remove(job.uid)
                self._retire(job)
                job.done = True
            elif kind == "stop":
                return
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _refuse_waiting(self) -> None:
        """Shutting down: requests not started get 503 at once (their clients may retry elsewhere)."""
        while self.waiting:
            job = self.waiting.popleft()
            with self.lock:
                self.queued -= 1
            if not job.cancelled:
                self._end(job, ("error", shutting_down()))

    def _admit(self) -> None:
        starting = len(self.group.starting) if self.group is not None else 0
        while self.waiting and len(self.active) + starting < self.max_batch:
            job = self.waiting.popleft()
            with self.lock:
                self.queued -= 1
            if job.cancelled:
                continue
            job.admitted = time.monotonic()
            try:
                self._insert(job)
                starting += self.group is not None
            except Exception as e:
                self._refuse(job, e)

    def _refuse(self, job: Job, e: Exception) -> None:
        """A request that could not start: bad settings (400) or a failure (500)."""
        if isinstance(e, MTPError):
            self._end(job, ("error", bad(str(e))))
        else:
            log.error("a request failed to start", exc_info=e)
            self._end(job, ("error", APIError(500, f"the request failed: {type(e).__name__}: {e}")))

    def _insert(self, job: Job) -> None:
        if self.group is not None:
            self.group.insert(job)  # started on every rank at the next step
            return
        request = job.request
        request.sampling.logits_processors = list(request.sampling.logits_processors) + processors(job.processors)
        request.logprobs = job.top_logprobs
        request.prompt_cache = self.pool.take(job.ids)
        self._bind(job, self.engine.insert(job.ids, request))

    def _bind(self, job: Job, uid: int) -> None:
        """The job's row is in the engine as `uid`."""
        request = job.request = self.engine.rows[uid].request
        job.uid, job.stats = uid, self.engine.rows[uid].stats
        job.text = TextStream(IncrementalDecoder(self.tokenizer, job.ids), job.stops, request.eos_ids,
                              self._text_of if job.top_logprobs is not None else None)
        self.active[uid] = job
        job.send(("start", job.stats.reused_prompt_tokens))

    def _step(self) -> None:
        try:
            events = self._round()
        except Exception as e:
            log.exception("a round failed")
            self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            return
        for event in events:
            job = self.active.get(event.uid)
            if job is None:
                continue
            if event.finish_reason == "error":  # the row's own processors failed: only it ends
                self._retire(job)
                self._end(job, ("error", APIError(400, f"the request failed: {event.error}")))
                continue
            try:
                with self.tokenizer_lock:
                    text, entries, stopped = job.text.feed(event.tokens, event.logprobs)
                    if not stopped and event.finish_reason:
                        more, more_entries, stopped = job.text.finish()
                        text, entries = text + more, entries + more_entries
                if text or entries:
                    job.add(text, entries)
                if stopped:
                    self._remove(event.uid)  # a no-op if the engine finished it too
                    self._finish(job, "stop")
                elif event.finish_reason:
                    self._finish(job, event.finish_reason)
            except Exception as e:
                log.exception("a request failed")
                self._remove(event.uid)
                self._retire(job)
                self._end(job, ("error", APIError(500, f"the request failed: {type(e).__name__}: {e}")))
        if self.active and not self.engine.busy:  # never expected: rows the engine no longer has
            for job in list(self.active.values()):
                self._retire(job)
                self._end(job, ("error", APIError(500, "the request was lost by the engine")))

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def _finish(self, job: Job, reason: str) -> None:
        # Retry-After's measure: seconds per generated token of a row (its prefill and batch included)
        per_token = (time.monotonic() - job.admitted) / max(job.text.count, 1)
        self.token_seconds = per_token if self.token_seconds is None else (self.token_seconds + per_token) / 2
        stats = job.stats
        usage = {
            "prompt_tokens": len(job.ids),
            "completion_tokens": job.text.count,
            "total_tokens": len(job.ids) + job.text.count,
            "prompt_tokens_details": {"cached_tokens": stats.reused_prompt_tokens},
            "mtp": {
                "num_draft_tokens": self.draft_tokens,
                "rounds": stats.rounds,
                "tokens_per_round": round(stats.tokens_per_round, 4),
                "acceptance_per_position": [round(a, 4) for a in stats.acceptance_per_position],
            },
        }
        self._retire(job)
        self._end(job, ("end", reason, usage))

    def _retire(self, job: Job) -> None:
        """The row has left the engine: its prompt cache goes back to the pool (under a group,
        the ranks' pools take it back when the row leaves their engines: serve_group)."""
        if self.active.pop(job.uid, None) is not None and self.group is None:
            try:
                self.pool.put(job.request.prompt_cache)
            except Exception:
                log.exception("could not keep a prompt cache")

    def _end(self, job: Job, item: tuple) -> None:
        job.done = True
        job.send(item)

    def _fail_all(self, message: str) -> None:
        for job in list(self.active.values()):
            self._end(job, ("error", APIError(500, message)))
        self.active.clear()
        if self.group is not None:  # the ranks may no longer be in step: the group stops
            self.group.fail(message)
            return
        self.pool.clear()  # caches may be in any state
        self.engine = self._new_engine()


def own_copy(tokenizer):
    """A copy of the tokenizer that shares no state with it (None if it cannot be copied)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:
        log.warning("the tokenizer cannot be copied: requests share the engine thread's", exc_info=True)
        return None


def processors(settings: dict) -> list:
    """A request's logit_bias / presence / frequency penalty settings as mlx-lm logits processors."""
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(settings.get("logit_bias"), presence_penalty=settings.get("presence_penalty"),
                                  presence_context_size=PENALTY_CONTEXT,
                                  frequency_penalty=settings.get("frequency_penalty"),
                                  frequency_context_size=PENALTY_CONTEXT)


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


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (the server's --max-body-bytes)",
                    code="request_too_large")


def validation_error(errors: list) -> APIError:
    """pydantic's type errors as one OpenAI-shaped error naming the first field (422)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return APIError(422, f"{param or 'body'}: {first.get('msg')}", param, "invalid_type")


# Browser chat UIs served from this machine (any port) may call the API; other origins only when
# named with --allow-origin (the server has no authentication).
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
        ids, tools = await run_in_threadpool(server.chat_ids, body)
        job = server.job(body, ids, settings, top)
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
          shutdown_grace: float = SHUTDOWN_GRACE) -> None:
    """Bind host:port, load the pair in the engine thread and warm it up while the HTTP server
    answers (/health: 503 "loading"), call `on_ready(worker)`, and serve until interrupted.
    `cache_options`: kv_bits, kv_group_size, quantized_kv_start, prefill_step_size (see
    api.stream_generate). `max_body_bytes`: the largest request body (413 beyond it).
    `shutdown_grace`: seconds running rows get to finish on SIGTERM."""
    from .serve_requests import Server
    from .sharding import launched

    sock = listening_socket(host, port)
    worker = Worker(loader, num_draft_tokens, max_batch, max_queue, prompt_cache_bytes, cache_options, warm_up=True)
    worker.start()
    app = create_app(Server(worker, model_id, default_max_tokens, max_body_bytes), allow_origins)
    config = uvicorn.Config(app, host=host, port=port, http="h11", log_level=log_level,
                            timeout_graceful_shutdown=shutdown_grace + FLUSH_SECONDS)
    server = HTTPServer(config, worker, shutdown_grace, on_ready)
    if launched():  # under mlx.launch: SIGTERM must reach the code that tells the other ranks to stop
        from .serve_group import exit_on_sigterm

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
