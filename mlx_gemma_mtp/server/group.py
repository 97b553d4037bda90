"""`gemma-mtp serve` over the processes `mlx.launch` started: rank 0 serves HTTP, the other ranks
replay rank 0's engine operations.

The target is split over the ranks (sharding.py) and every round's forward makes all-sums across
them, so every rank must run the same engine operations in the same order. Rank 0's engine thread
(server.Worker) does not change its engine itself: it records each operation as a command (JSON:
insert a prompt with its request settings, remove a row, stop), and every rank, rank 0 included,
applies the commands at the same step to its `Replica` (the engine and the prompt cache pool,
changed only by commands and by the engine's own steps). The engine numbers rows in insertion
order, so the uids agree on every rank; the requests are rebuilt from their settings on each rank
(logits processors too); the pools take and keep the same caches in the same order (every rank's
caches have the same sizes: each keeps as many KV heads per layer), so rows reuse the same prompts.

The commands travel through the group itself: at every step each rank all-sums a fixed-size frame
of bytes, rank 0's holding its commands, the others' zeros, so every rank receives rank 0's bytes.
A message longer than a frame spans several steps; it is applied when its last part arrives.
"""

import json
import logging
import os
import signal

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.runtime.engine import Request
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.housekeeping import generation_stream
from mlx_gemma_mtp.server.prompt_pool import PromptCachePool
from mlx_gemma_mtp.server.errors import APIError
from mlx_gemma_mtp.server.jobs import processors

log = logging.getLogger("mlx_gemma_mtp.server.app")

FRAME = 64 << 10  # bytes all-summed per step: a prompt of about 8k tokens fits one
HEADER = 4  # the frame's first bytes: how many bytes of it carry data


class Exchange:
    """Rank 0's bytes to every rank, one frame per step through an all-sum over the group."""

    def __init__(self, group, frame: int = FRAME):
        self.group, self.frame = group, frame
        self.outgoing = b""  # rank 0: length-prefixed messages still to send
        self.incoming = b""  # received, not yet a whole message
        self._summed = None

    @property
    def busy(self) -> bool:
        return bool(self.outgoing or self.incoming)

    def send(self, message: bytes) -> None:
        self.outgoing += len(message).to_bytes(4, "little") + message

    def start(self) -> None:
        """Queue this step's all-sum; `finish` reads it."""
        n = self.frame - HEADER
        data, self.outgoing = self.outgoing[:n], self.outgoing[n:]
        frame = np.zeros(self.frame, np.uint8)
        frame[:HEADER] = np.frombuffer(len(data).to_bytes(HEADER, "little"), np.uint8)
        frame[HEADER : HEADER + len(data)] = np.frombuffer(data, np.uint8)
        # on the engine's stream: the all-sums of a group must run in one order on every rank, and
        # two streams run their work side by side
        with mx.stream(generation_stream):
            self._summed = mx.distributed.all_sum(mx.array(frame), group=self.group)
        mx.async_eval(self._summed)

    def finish(self) -> list:
        """The messages this step's frame completed."""
        frame = np.array(self._summed)
        self._summed = None
        n = int.from_bytes(frame[:HEADER].tobytes(), "little")
        self.incoming += frame[HEADER : HEADER + n].tobytes()
        messages = []
        while len(self.incoming) >= 4:
            size = int.from_bytes(self.incoming[:4], "little")
            if len(self.incoming) < 4 + size:
                break
            messages.append(self.incoming[4 : 4 + size])
            self.incoming = self.incoming[4 + size :]
        return messages


def insert_command(key: int, job) -> dict:
    """A server Job as the command every rank starts its row from."""
    bias = job.processors.get("logit_bias")
    settings = {**job.processors, "logit_bias": None if bias is None else [[t, v] for t, v in bias.items()]}
    request = {**job.settings, "seed": job.request.sampling.seed}  # the seed drawn for it, if any
    return {"op": "insert", "key": key, "ids": [int(t) for t in job.ids], "request": request,
            "processors": settings, "logprobs": job.top_logprobs, "eos": sorted(job.request.eos_ids)}


def request_of(pair, tokenizer, command: dict) -> Request:
    """The row's Request, rebuilt from its command the same way on every rank."""
    from mlx_gemma_mtp.api import make_request

    request = make_request(pair, tokenizer, len(command["ids"]), **command["request"])
    settings = dict(command["processors"])
    if settings.get("logit_bias") is not None:
        settings["logit_bias"] = {int(t): v for t, v in settings["logit_bias"]}
    request.sampling.logits_processors = list(request.sampling.logits_processors) + processors(settings)
    request.logprobs = command["logprobs"]
    request.eos_ids = frozenset(command["eos"])
    return request


class Replica:
    """One rank's engine and prompt cache pool, changed only by rank 0's commands and by the
    engine's own steps, so they stay the same on every rank."""

    def __init__(self, pair, tokenizer, engine, pool: PromptCachePool):
        self.pair, self.tokenizer, self.engine, self.pool = pair, tokenizer, engine, pool
        self.exchange = Exchange(pair.group)
        self.requests: dict = {}  # uid -> Request of a row in the engine
        self.stopped = False

    def round(self) -> tuple:
        """One step on every rank: (the engine's events, [(command, result)] applied after it)."""
        # Queued before step() queues round n + 1, read after step() has read round n: the frame's
        # all-sum runs between the two rounds, so reading it waits for that small all-sum at most
        # (measured: under 1 ms) while round n + 1 keeps the device busy. Read before step(), it
        # would wait for round n with nothing queued behind it: a bubble every round.
        self.exchange.start()
        events = self.engine.step() if self.engine.busy else []
        for event in events:
            if event.finish_reason:
                self._release(event.uid)
        applied = []
        for message in self.exchange.finish():
            applied += [(c, self.apply(c)) for c in json.loads(message)]
        return events, applied

    def apply(self, command: dict):
        """-> the row's uid, or the exception that refused it, for an insert; None otherwise."""
        op = command["op"]
        if op == "insert":
            try:
                request = request_of(self.pair, self.tokenizer, command)
                request.prompt_cache = self.pool.take(command["ids"])
                uid = self.engine.insert(command["ids"], request)
            except Exception as e:  # the same on every rank: that request fails, the rest goes on
                return e
            self.requests[uid] = request
            return uid
        if op == "remove":
            self.engine.remove(command["uid"])  # a no-op when the row already finished
            self._release(command["uid"])
        elif op == "stop":
            self.stopped = True
        return None

    def _release(self, uid: int) -> None:
        """A row left the engine: its prompt cache goes back to the pool."""
        request = self.requests.pop(uid, None)
        if request is not None:
            try:
                self.pool.put(request.prompt_cache)
            except Exception:
                log.exception("could not keep a prompt cache")


class Leader:
    """Rank 0's engine thread under a group: its operations recorded as commands and applied on
    every rank at the next step (`server.Worker` calls insert/remove/round)."""

    def __init__(self, worker):
        self.worker = worker
        self.replica = Replica(worker.pair, worker.tokenizer, worker.engine, worker.pool)
        self.outbox: list = []  # commands recorded since the last step
        self.starting: dict = {}  # insert key -> Job whose row is not started yet
        self.broken = False
        self._key = 0

    @property
    def pending(self) -> bool:
        return bool(self.outbox or self.starting or self.replica.exchange.busy)

    def insert(self, job) -> None:
        self._key += 1
        self.starting[self._key] = job
        self.outbox.append(insert_command(self._key, job))

    def remove(self, uid: int) -> None:
        self.outbox.append({"op": "remove", "uid": uid})

    def round(self) -> list:
        """One step of every rank; starts the jobs whose inserts arrived. -> the events."""
        if self.outbox:
            self.replica.exchange.send(json.dumps(self.outbox).encode())
            self.outbox = []
        events, applied = self.replica.round()
        w = self.worker
        for command, result in applied:
            if command["op"] != "insert":
                continue
            job = self.starting[command["key"]]
            if isinstance(result, Exception):
                w.refuse(job, result)
            else:
                w.bind(job, result)
                if job.cancelled:  # gone while its insert was on its way
                    self.remove(job.uid)
                    w.retire(job)
                    job.done = True
            del self.starting[command["key"]]
        return events

    def close(self) -> None:
        """Tell every rank to stop, and step until they have been told (the engine thread's end)."""
        if not self.broken:
            self.outbox.append({"op": "stop"})
            try:
                while not self.replica.stopped:
                    self.round()
            except Exception as e:  # another rank is already gone
                log.warning("could not stop the other processes: %s", e)

    def fail(self, message: str) -> None:
        """A round failed: the ranks may no longer be in step, so the whole group stops (rank 0
        exits with an error; the other ranks then lose their connection to it, and mlx.launch
        ends them)."""
        w = self.worker
        for job in [*self.starting.values(), *w.waiting]:
            w.end(job, ("error", APIError(500, message)))
        self.starting.clear()
        w.waiting.clear()
        self.broken = True
        w.failed, w.stopping = message, True
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread stops serving (exit_on_sigterm)


def exit_on_sigterm() -> None:
    """SIGTERM stops rank 0 as Ctrl-C does: uvicorn stops serving, then the engine thread tells the
    other ranks to stop. (uvicorn raises the signal again once it has stopped; SIGTERM's default
    action would end the process there, before the other ranks were told.)"""
    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def follow(pair, tokenizer, num_draft_tokens, prompt_cache_bytes: int, cache_options: dict) -> None:
    """A rank other than 0: replay rank 0's engine operations until it says stop."""
    from mlx_gemma_mtp.api import make_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    engine = make_engine(pair, num_draft_tokens if pair.drafter is not None else 0, **cache_options)
    replica = Replica(pair, tokenizer, engine, PromptCachePool(prompt_cache_bytes))
    while not replica.stopped:
        try:
            replica.round()
        except RuntimeError as e:  # MLX's backend: "connection to a peer was lost"
            raise MTPError(f"rank {pair.group.rank()} lost the group ({e}): rank 0 has stopped") from None
