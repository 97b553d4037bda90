"""The engine thread of `gemma-mtp serve`, and the jobs it runs.

The engine thread owns MLX: it loads the pair, runs `runtime.engine.Engine` and is the only thread
that calls MLX. Requests reach it through a thread-safe inbox ("submit", "cancel", "close"); between
two rounds it admits waiting requests (at most `max_batch` rows decode at once), removes cancelled
ones, runs one `Engine.step()` and turns each row's tokens into text (`server.text.TextStream`).
What a request receives goes to its own asyncio queue through `loop.call_soon_threadsafe`: each
round's text for a stream; for a reply sent whole, only its end (the text waits in the job). A
finished row's KV cache goes back to the prompt cache pool (`server.prompt_pool`).

Under `mlx.launch` (the target split over processes) the engine thread's operations go to every
rank through `server.group.Leader`, which calls the public methods below.
"""

import copy
import heapq
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.detokenize import IncrementalDecoder
from mlx_gemma_mtp.runtime.housekeeping import keep_weights_wired, release_cache
from mlx_gemma_mtp.server.errors import APIError, bad, retry_headers, shutting_down
from mlx_gemma_mtp.server.jobs import Job, processors
from mlx_gemma_mtp.runtime.images import cache_keys
from mlx_gemma_mtp.server.prompt_pool import PromptCachePool
from mlx_gemma_mtp.server.text import TextStream

log = logging.getLogger("mlx_gemma_mtp.server")

TOKEN_SECONDS_GUESS = 0.05  # Retry-After's seconds per generated token of a row, until a request has finished
# Retry-After's bounds (clients give up on long waits: OpenAI's past two minutes), and its margin: a
# client that comes back a little late waits a moment in the queue, one that comes back early is
# refused again (and rows of one length finish together, right at the estimate)
MIN_RETRY_AFTER, MAX_RETRY_AFTER, RETRY_MARGIN = 0.25, 60.0, 1.25
WARM_UP_TOKENS = 24  # tokens per warm-up row: enough rounds for each decode forward to be compiled (HOT_SHAPE)
STATM = "/proc/self/statm"  # Linux's current resident memory (macOS has no /proc)


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


# --- the engine thread ---


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
                from mlx_gemma_mtp.server.group import Leader

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
        from mlx_gemma_mtp.api import make_engine, make_request

        start = time.perf_counter()
        prompt = list(self.tokenizer.encode("def main():\n    for item in items:")) or [0]

        def row(temperature: float, logprobs: Optional[int] = None):
            request = make_request(self.pair, self.tokenizer, len(prompt), WARM_UP_TOKENS,
                                   temperature=temperature, seed=0)
            request.eos_ids, request.logprobs = frozenset(), logprobs  # every token is generated
            return request

        engines = [self.engine]
        if self.draft_tokens != 0:  # a plain round (K = 0): the target's one-token forward
            engines.append(make_engine(self.pair, 0, **self.cache_options))
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
            self.retire(job)
            self.end(job, ("error", APIError(503, "the server is shutting down: the reply was cut short",
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
        from mlx_gemma_mtp.api import make_engine

        return make_engine(self.pair, self.draft_tokens, **self.cache_options)

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
                self.retire(job)
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
                self.end(job, ("error", shutting_down()))

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
                self.refuse(job, e)

    def refuse(self, job: Job, e: Exception) -> None:
        """A request that could not start: bad settings (400) or a failure (500)."""
        if isinstance(e, MTPError):
            self.end(job, ("error", bad(str(e))))
        else:
            log.error("a request failed to start", exc_info=e)
            self.end(job, ("error", APIError(500, f"the request failed: {type(e).__name__}: {e}")))

    def _insert(self, job: Job) -> None:
        if self.group is not None:
            if job.images:
                raise MTPError("images are not supported under mlx.launch yet")
            self.group.insert(job)  # started on every rank at the next step
            return
        request = job.request
        request.sampling.logits_processors = list(request.sampling.logits_processors) + processors(job.processors)
        request.logprobs = job.top_logprobs
        request.prompt_cache = self.pool.take(cache_keys(job.ids, job.images))
        self.bind(job, self.engine.insert(job.ids, request, job.images))

    def bind(self, job: Job, uid: int) -> None:
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
                self.retire(job)
                self.end(job, ("error", APIError(400, f"the request failed: {event.error}")))
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
                self.retire(job)
                self.end(job, ("error", APIError(500, f"the request failed: {type(e).__name__}: {e}")))
        if self.active and not self.engine.busy:  # never expected: rows the engine no longer has
            for job in list(self.active.values()):
                self.retire(job)
                self.end(job, ("error", APIError(500, "the request was lost by the engine")))

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
        self.retire(job)
        self.end(job, ("end", reason, usage))

    def retire(self, job: Job) -> None:
        """The row has left the engine: its prompt cache goes back to the pool (under a group,
        the ranks' pools take it back when the row leaves their engines: serve_group)."""
        if self.active.pop(job.uid, None) is not None and self.group is None:
            try:
                self.pool.put(job.request.prompt_cache)
            except Exception:
                log.exception("could not keep a prompt cache")

    def end(self, job: Job, item: tuple) -> None:
        job.done = True
        job.send(item)

    def _fail_all(self, message: str) -> None:
        for job in list(self.active.values()):
            self.end(job, ("error", APIError(500, message)))
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
