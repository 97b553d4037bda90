"""`gemma-mtp serve`: an OpenAI-compatible HTTP server, MTP decoding under continuous batching.

Threads:
- The engine thread owns MLX: it loads the pair, runs `engine.Engine` and is the only thread that
  calls MLX. Requests reach it through a thread-safe inbox ("submit", "cancel"); between two rounds
  it admits waiting requests (at most `max_batch` rows decode at once), removes cancelled ones,
  runs one `Engine.step()` and turns each row's tokens into text: incremental detokenization, stop
  strings (text that could begin one is held back; a found stop ends the row at once, even inside a
  multi-token block the drafter got accepted) and log-probabilities. What a request receives goes to
  its own asyncio queue through `loop.call_soon_threadsafe`.
- The event loop (uvicorn, FastAPI) parses and checks requests, renders chat templates, encodes
  prompts, and formats responses: OpenAI JSON or server-sent events, tool calls parsed with the
  tokenizer's tool parser (mlx-lm picks Gemma 4's from the chat template).

A client that goes away is removed from the batch before the next round. Requests beyond
`max_batch` wait in a queue of at most `max_queue`; past that the answer is 429.

Prompt cache: a finished row's KV cache (holding its prompt and output) goes into a small LRU,
bounded in bytes. A new request takes out the entry sharing the longest token prefix with its
prompt, so a conversation's next turn computes only its new tokens; an entry is never used by two
rows at once. Only an entry that needs to move back at most `cache.REUSE_ROLLBACK` tokens is taken
(the sliding-window rings cannot move back further: the engine would reset it): so a conversation
is not given up for a shared first line, and a prompt sent again is reused only when its previous
reply was short.
"""

import asyncio
import json
import logging
import math
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import MTPError
from .openai_schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("mlx_gemma_mtp.server")

MAX_STOPS = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # the engine's limit (and OpenAI's for chat)
PENALTY_CONTEXT = 20  # tokens presence/frequency penalties look back over (mlx-lm's default)
DISCONNECT_POLL = 0.5  # seconds between checks for a gone client while a non-streamed reply waits


# --- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


# --- text: detokenization, stop strings, log-probabilities (engine thread) -----------------------


def held_suffix(text: str, stops: list) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """One row's tokens as released text.

    Text that could be the beginning of a stop string is held back until it cannot; a stop string
    is looked for after every token, so it is found across token boundaries and inside a block of
    several accepted tokens, and neither it nor anything after it is released. Each token's
    log-probability entry is released with the text where its token begins.
    """

    def __init__(self, detokenizer, stops: list, eos_ids, token_text: Optional[Callable] = None):
        self.detok = detokenizer
        self.detok.reset()
        self.stops, self.eos_ids, self.token_text = stops, eos_ids, token_text
        self.sent = 0  # characters of detok.text released
        self.entries = deque()  # (start character, log-probability entry) not yet released
        self.count = 0  # tokens consumed (an EOS and a token that completes a stop included)

    @property
    def text(self) -> str:
        return self.detok.text

    def feed(self, tokens: list, logprobs: Optional[list] = None) -> tuple:
        """-> (released text, released log-probability entries, stopped at a stop string)."""
        for j, t in enumerate(tokens):
            self.count += 1
            if t in self.eos_ids:
                continue  # an end-of-turn token is not text (the engine finishes the row)
            start = len(self.text)
            self.detok.add_token(t)
            if logprobs is not None and self.token_text is not None:
                chosen, top = logprobs[j]
                self.entries.append((start, (self.token_text(t), chosen,
                                             [(self.token_text(i), v) for i, v in top])))
            at = self._find_stop()
            if at is not None:
                return (*self._release(at), True)
        return (*self._release(len(self.text) - held_suffix(self.text[self.sent:], self.stops)), False)

    def finish(self) -> tuple:
        """At the row's end: flush the detokenizer -> (text, entries, stopped)."""
        self.detok.finalize()
        at = self._find_stop()
        if at is not None:
            return (*self._release(at), True)
        return (*self._release(len(self.text), everything=True), False)

    def _find_stop(self) -> Optional[int]:
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _release(self, end: int, everything: bool = False) -> tuple:
        """Text up to `end`, and the entries of the tokens that begin before it (all: at the end)."""
        text, self.sent = self.text[self.sent:end], max(self.sent, end)
        released = []
        while self.entries and (everything or self.entries[0][0] < end):
            released.append(self.entries.popleft()[1])
        return text, released


# --- tool calls (event loop) ---------------------------------------------------------------------


def openai_tool_calls(parsed, index: int = 0) -> list:
    """mlx-lm tool parser output (a {"name", "arguments"} dict or a list of them) as OpenAI
    tool_calls, numbered from `index`."""
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for n, call in enumerate(calls):
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.append({"index": index + n, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": call["name"], "arguments": arguments}})
    return out


class ToolCallSplitter:
    """Splits released text into content and tool calls: the text between the tokenizer's
    `tool_call_start` and `tool_call_end` markers, parsed with its `tool_parser` (for Gemma 4,
    `<|tool_call>call:name{key:<|"|>value<|"|>}<tool_call|>`). Text that could begin a start
    marker is held back. A call that does not parse is passed on as content, markers included."""

    def __init__(self, start: Optional[str], end: Optional[str], parser: Optional[Callable], tools=None):
        self.start, self.end, self.parser, self.tools = start, end, parser, tools
        self.enabled = bool(start and end and parser)
        self.buffer, self.inside, self.calls = "", False, 0

    def feed(self, text: str) -> list:
        """-> [("content", str) | ("tool_calls", [OpenAI tool call, ...])]"""
        if not self.enabled:
            return [("content", text)] if text else []
        self.buffer += text
        out = []
        while True:
            if not self.inside:
                i = self.buffer.find(self.start)
                if i < 0:
                    keep = held_suffix(self.buffer, [self.start])
                    self._content(out, self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                self._content(out, self.buffer[:i])
                self.buffer, self.inside = self.buffer[i + len(self.start):], True
            j = self.buffer.find(self.end)
            if j < 0:
                return out
            self._call(out, self.buffer[:j], self.start + self.buffer[: j + len(self.end)])
            self.buffer, self.inside = self.buffer[j + len(self.end):], False

    def finish(self) -> list:
        out, rest, self.buffer = [], self.buffer, ""
        if self.inside:  # a call the model did not close (it may have stopped right after it)
            self._call(out, rest, self.start + rest)
        else:
            self._content(out, rest)
        return out

    def _content(self, out: list, text: str) -> None:
        if text:
            out.append(("content", text))

    def _call(self, out: list, inner: str, raw: str) -> None:
        try:
            calls = openai_tool_calls(self.parser(inner, self.tools), self.calls)
        except Exception:
            self._content(out, raw)
            return
        self.calls += len(calls)
        out.append(("tool_calls", calls))


def split_tool_calls(text: str, tokenizer, tools) -> tuple:
    """A whole reply -> (content or None, tool_calls list)."""
    splitter = ToolCallSplitter(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser, tools)
    parts = splitter.feed(text) + splitter.finish()
    content = "".join(p for kind, p in parts if kind == "content")
    calls = [c for kind, p in parts if kind == "tool_calls" for c in p]
    if calls and not content.strip():
        content = None
    return content, calls


# --- the prompt cache pool (engine thread) -------------------------------------------------------


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCachePool:
    """An LRU of PromptCache objects bounded in bytes; an entry is taken out while a row uses it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()  # id -> (PromptCache, bytes)
        self.bytes = 0  # a plain number, so other threads can read it while this one changes entries

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def take(self, ids: list):
        """The entry sharing the longest prefix with `ids`, taken out; None if none can be reused
        (the engine moves a cache back at most REUSE_ROLLBACK tokens, and resets one it cannot)."""
        from .cache import REUSE_ROLLBACK

        best, best_n = None, 0
        for key, (pc, _) in self.entries.items():
            n = common_prefix(pc.tokens, ids[:-1])  # the last prompt token is always computed
            if n > best_n and len(pc.tokens) - n <= REUSE_ROLLBACK:
                best, best_n = key, n
        if best is None:
            return None
        pc, size = self.entries.pop(best)
        self.bytes -= size
        return pc

    def put(self, pc) -> None:
        import mlx.core as mx

        from .cache import cache_bytes

        if pc is None or not pc.tokens or self.max_bytes <= 0:
            return
        mx.eval([c.state for c in pc.cache])  # detach it from the batch's buffers
        size = cache_bytes(pc.cache)
        if size > self.max_bytes:
            return
        self.entries[id(pc)] = (pc, size)
        self.bytes += size
        while self.bytes > self.max_bytes:  # least recently used first
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped


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

    def send(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is going down
            pass


class Worker(threading.Thread):
    """The engine thread. `loader()` -> (pair, tokenizer) runs in it, so MLX lives in one thread."""

    def __init__(self, loader: Callable, num_draft_tokens="adaptive", max_batch: int = 8, max_queue: int = 64,
                 prompt_cache_bytes: int = 2 << 30):
        super().__init__(name="gemma-mtp-engine", daemon=True)
        self.loader, self.setting = loader, num_draft_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pool = PromptCachePool(prompt_cache_bytes)
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # guards `queued`
        self.queued = 0  # submitted, not yet admitted
        self.tokenizer_lock = threading.Lock()  # the tokenizer is shared with the event loop
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.stopping = False
        self.pair = self.tokenizer = self.engine = None
        self.waiting: deque = deque()
        self.active: dict = {}  # uid -> Job
        self._token_text: dict = {}

    # --- called from other threads ---

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.queued >= self.max_queue:
                raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting",
                               code="rate_limit_exceeded", kind="rate_limit_error")
            self.queued += 1
        self.inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        if not job.done:
            job.cancelled = True
            self.inbox.put(("cancel", job))

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(("stop", None))

    @property
    def draft_tokens(self):
        """The server-wide draft length (0 without a drafter)."""
        return self.setting if self.pair is not None and self.pair.drafter is not None else 0

    def status(self) -> dict:
        return {"running": len(self.active), "waiting": self.queued, "prompt_cache_entries": len(self.pool.entries),
                "prompt_cache_bytes": self.pool.bytes}

    # --- the engine thread ---

    def run(self) -> None:
        try:
            self.pair, self.tokenizer = self.loader()
            self.engine = self._new_engine()
        except BaseException as e:  # reported by the main thread
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        while not self.stopping:
            try:
                self._drain(block=not self.active and not self.waiting)
                self._admit()
                if self.active:
                    self._step()
            except Exception as e:  # a bug in the loop itself: fail what runs, start afresh
                log.exception("engine loop failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _new_engine(self):
        from .engine import Engine

        return Engine(self.pair, self.draft_tokens)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.25) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = item
            if kind == "submit":
                self.waiting.append(job)
            elif kind == "cancel" and job.uid is not None and job.uid in self.active:
                self.engine.remove(job.uid)
                self._retire(job)
                job.done = True
            elif kind == "stop":
                return
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            job = self.waiting.popleft()
            with self.lock:
                self.queued -= 1
            if job.cancelled:
                continue
            try:
                self._insert(job)
            except MTPError as e:
                self._end(job, ("error", bad(str(e))))
            except Exception as e:
                log.exception("a request failed to start")
                self._end(job, ("error", APIError(500, f"the request failed: {type(e).__name__}: {e}")))

    def _insert(self, job: Job) -> None:
        from mlx_lm.sample_utils import make_logits_processors

        p = job.processors
        extra = make_logits_processors(p.get("logit_bias"), presence_penalty=p.get("presence_penalty"),
                                       presence_context_size=PENALTY_CONTEXT,
                                       frequency_penalty=p.get("frequency_penalty"),
                                       frequency_context_size=PENALTY_CONTEXT)
        request = job.request
        request.sampling.logits_processors = list(request.sampling.logits_processors) + extra
        request.logprobs = job.top_logprobs
        request.prompt_cache = self.pool.take(job.ids)
        uid = self.engine.insert(job.ids, request)
        job.uid, job.stats = uid, self.engine.rows[uid].stats
        job.text = TextStream(self.tokenizer.detokenizer, job.stops, request.eos_ids,
                              self._text_of if job.top_logprobs is not None else None)
        self.active[uid] = job
        job.send(("start", job.stats.reused_prompt_tokens))

    def _step(self) -> None:
        try:
            events = self.engine.step()
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
                    job.send(("delta", text, entries))
                if stopped:
                    self.engine.remove(event.uid)  # a no-op if the engine finished it too
                    self._finish(job, "stop")
                elif event.finish_reason:
                    self._finish(job, event.finish_reason)
            except Exception as e:
                log.exception("a request failed")
                self.engine.remove(event.uid)
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
        """The row has left the engine: its prompt cache goes back to the pool."""
        if self.active.pop(job.uid, None) is not None:
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
        self.pool.clear()  # caches may be in any state
        self.engine = self._new_engine()


# --- requests: prompts and settings (event loop) -------------------------------------------------


def message_text(content, where: str) -> Optional[str]:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad(f"{where}: only text content parts are supported, got '{part.type}'", "messages")
        parts.append(part.text)
    return "".join(parts)


def template_messages(body: ChatCompletionRequest) -> list:
    """OpenAI messages as chat-template messages (tool call arguments as dicts, as templates
    such as Gemma 4's expect)."""
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        msg = {"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content, where)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                arguments = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except json.JSONDecodeError:
                        raise bad(f"{where}: tool call arguments are not JSON", "messages") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments or {}}})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def chosen_tools(body: ChatCompletionRequest) -> Optional[list]:
    """The tools the template sees: none for tool_choice "none", one for a named function."""
    tools, choice = body.tools, body.tool_choice
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        named = [t for t in tools if (t.get("function") or {}).get("name") == name]
        if not named:
            raise bad(f"tool_choice names '{name}', which is not among the tools", "tool_choice")
        return named
    if choice not in (None, "auto", "required"):
        raise bad(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}", "tool_choice")
    return tools


def check_number(value, name: str, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise bad(f"{name} must be between {low:g} and {high:g}, got {value}", name)


class Server:
    """What the HTTP handlers share: the engine thread, the tokenizer, the served model's name."""

    def __init__(self, worker: Worker, model_id: str, default_max_tokens: int = 512):
        self.worker, self.model_id, self.default_max_tokens = worker, model_id, default_max_tokens
        self.pair, self.tokenizer = worker.pair, worker.tokenizer
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}'",
                           "model", "model_not_found")

    def check_length(self, ids: list) -> None:
        context = self.pair.view.args.max_position_embeddings
        if len(ids) >= context:
            raise bad(f"the prompt has {len(ids)} tokens; the model's context is {context} tokens",
                      "messages", "context_length_exceeded")

    def chat_ids(self, body: ChatCompletionRequest) -> tuple:
        if not self.tokenizer.has_chat_template:
            raise bad("the model's tokenizer has no chat template: use /v1/completions", "messages")
        messages, tools = template_messages(body), chosen_tools(body)
        try:
            with self.worker.tokenizer_lock:
                ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except Exception as e:  # the template refused the conversation
            raise bad(f"the chat template could not render the messages: {e}", "messages") from None
        ids = list(ids)
        self.check_length(ids)
        return ids, tools

    def completion_ids(self, body: CompletionRequest) -> list:
        from .api import prompt_ids

        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad("one prompt per request is supported", "prompt", "unsupported_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            vocab = self.pair.view.args.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise bad(f"the prompt's token ids must be in [0, {vocab})", "prompt")
        else:
            with self.worker.tokenizer_lock:
                prompt = self.tokenizer.encode(prompt) if prompt else []
        if not prompt:
            raise bad("the prompt is empty", "prompt")
        self.check_length(prompt)
        try:
            return prompt_ids(self.pair, self.tokenizer, prompt)
        except MTPError as e:
            raise bad(str(e), "prompt") from None

    def job(self, body, ids: list, max_tokens: Optional[int], top_logprobs: Optional[int]) -> Job:
        """Check the settings and build the row's Request (without MLX: processors that need
        arrays are built in the engine thread)."""
        from .api import make_request
        from .limits import check_draft_tokens

        if body.n not in (None, 1):
            raise bad("n > 1 is not supported: send one request per choice", "n", "unsupported_value")
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise bad(f"at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise bad("stop strings must not be empty", "stop")
        check_number(body.presence_penalty, "presence_penalty", -2, 2)
        check_number(body.frequency_penalty, "frequency_penalty", -2, 2)
        bias = None
        if body.logit_bias:
            vocab, bias = self.pair.view.args.vocab_size, {}
            for key, value in body.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise bad(f"logit_bias keys must be token ids, got '{key}'", "logit_bias") from None
                if not 0 <= token < vocab:
                    raise bad(f"logit_bias token {token} is outside the vocabulary [0, {vocab})", "logit_bias")
                check_number(value, "logit_bias", -100, 100)
                bias[token] = value
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}", "top_logprobs")
        if body.num_draft_tokens is not None:
            try:
                asked = check_draft_tokens(body.num_draft_tokens)
            except MTPError as e:
                raise bad(str(e), "num_draft_tokens") from None
            if asked != self.worker.draft_tokens:
                raise bad(f"num_draft_tokens is set for the whole server ({self.worker.draft_tokens}: one batch "
                          f"drafts one length); this request asked for {asked}", "num_draft_tokens",
                          "unsupported_value")
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed
        if seed is None and not (isinstance(temperature, (int, float)) and temperature == 0):
            seed = random.randrange(2**31)  # what Sampling would draw, without touching MLX here
        kwargs = dict(temperature=temperature, seed=seed)
        for name in ("top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size"):
            if getattr(body, name) is not None:
                kwargs[name] = getattr(body, name)
        try:
            request = make_request(self.pair, self.tokenizer, len(ids), max_tokens, **kwargs)
        except MTPError as e:  # its messages begin with the argument's name
            name = str(e).split(" ", 1)[0]
            raise bad(str(e), name if name in type(body).model_fields else None) from None
        loop = asyncio.get_running_loop()
        processors = {"logit_bias": bias, "presence_penalty": body.presence_penalty,
                      "frequency_penalty": body.frequency_penalty}
        return Job(ids, request, stops, top_logprobs, processors, loop, asyncio.Queue())


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


# --- responses -----------------------------------------------------------------------------------


def chat_logprobs(entries: list) -> list:
    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return [{**one(text, lp), "top_logprobs": [one(t, v) for t, v in top]} for text, lp, top in entries]


def completion_logprobs(entries: list, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for text, lp, top in entries:
        tokens.append(text)
        values.append(lp)
        top_map = {}
        for t, v in top:
            top_map.setdefault(t, v)
        tops.append(top_map)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="gemma-mtp", description="Gemma 4 with MTP speculative decoding, OpenAI-compatible")
    worker = server.worker

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") in ("json_invalid", "json_type") for e in errors):
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return APIError(422, f"{param or 'body'}: {first.get('msg')}", param, "invalid_type").response()

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
        alive = worker.is_alive()
        body = {"status": "ok" if alive else "engine stopped", "model": server.model_id, **worker.status()}
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card():
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "mlx-gemma-mtp"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

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
        text, entries = [], []
        while True:
            item = await next_item(job, worker, http)
            if item is None:
                return None
            if item[0] == "delta":
                text.append(item[1])
                entries += item[2]
            elif item[0] == "error":
                raise item[1]
            else:
                return "".join(text), entries, item[1], item[2]

    def gone():
        return JSONResponse({"error": {"message": "client closed the request", "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        server.check_model(body.model)
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise bad("response_format other than text is not supported", "response_format", "unsupported_value")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        ids, tools = server.chat_ids(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = server.job(body, ids, max_tokens, top)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": server.model_id}
        tok = server.tokenizer
        use_tools = tools is not None and tok.has_tool_calling
        if await start(job, http) is None:
            return gone()

        if not body.stream:
            result = await collect(job, http)
            if result is None:
                return gone()
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

        async def events():
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

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        server.check_model(body.model)
        if body.echo:
            raise bad("echo is not supported", "echo", "unsupported_value")
        if body.suffix:
            raise bad("suffix is not supported", "suffix", "unsupported_value")
        if body.best_of not in (None, 1):
            raise bad("best_of > 1 is not supported", "best_of", "unsupported_value")
        ids = server.completion_ids(body)
        job = server.job(body, ids, body.max_tokens, body.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": server.model_id}
        want_lp = body.logprobs is not None
        if await start(job, http) is None:
            return gone()

        if not body.stream:
            result = await collect(job, http)
            if result is None:
                return gone()
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

        async def events():
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

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# --- running it ----------------------------------------------------------------------------------


def serve(loader: Callable, model_id: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8,
          num_draft_tokens="adaptive", max_queue: int = 64, prompt_cache_bytes: int = 2 << 30,
          default_max_tokens: int = 512, log_level: str = "info", on_ready: Optional[Callable] = None) -> None:
    """Load the pair in the engine thread, then serve until interrupted."""
    import uvicorn

    worker = Worker(loader, num_draft_tokens, max_batch, max_queue, prompt_cache_bytes)
    worker.start()
    worker.ready.wait()
    if worker.load_error is not None:
        raise worker.load_error
    app = create_app(Server(worker, model_id, default_max_tokens))
    config = uvicorn.Config(app, host=host, port=port, http="h11", log_level=log_level,
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(worker)
    try:
        server.run()
    finally:
        worker.stop()
        worker.join(timeout=5)
