"""The batched, pipelined speculative decoding engine.

B rows decode together. A round drafts K tokens for every row, verifies [last, d1..dK] of every
row in one target forward, and decides each row's accepted count, all on the device: each row's
cache offset moves by its own count (ragged acceptance), and the next round's inputs (each row's
last token and hidden state) are gathered on the device by that count. So round n + 1 is queued
before the host reads round n: the host streams tokens and checks stops one round late, with one
synchronization per round, while the device works. A row that stopped may have had one more
round queued; that round's tokens for it are discarded, never emitted.

Rows join and leave between rounds: `insert` queues a prompt (prefilled in chunks, one chunk per
`step`, so running rows wait at most one chunk), `remove` drops a row, and `step` returns what
each row emitted. `stream_generate`/`generate` are this engine with one row.

Rows with logits processors (which need every token before the one they judge) run their rounds
read-then-queue: the host knows each row's tokens before it builds the next round. Rows with a
grammar constraint (runtime.grammar) do too, and their rounds read the drafts before verifying
them: the host computes each verification position's mask from the drafts before it.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.runtime.adaptive import DraftPolicies, EveryBatch, FixedDraft
from mlx_gemma_mtp.runtime.cache import Blocks, concat_rows, reserve, set_blocks, set_offset, take_rows
from mlx_gemma_mtp.runtime.grammar import Constraint, apply_masks
from mlx_gemma_mtp.runtime.images import cache_keys, chunk_end, spans_in
from mlx_gemma_mtp.runtime.pair import Pair, PromptCache, Stats, reuse_prompt_cache
from mlx_gemma_mtp.runtime.housekeeping import RELEASE_EVERY, generation_stream, release_cache
from mlx_gemma_mtp.limits import MAX_DRAFT_TOKENS, check_draft_tokens
from mlx_gemma_mtp.runtime.quantized_cache import is_quantized, quantize_cache
from mlx_gemma_mtp.runtime.sampling import Sampling, group_key, process, strategy_of

PREFILL_STEP = 512
IDLE_PREFILL_CHUNKS = 8  # prefill chunks per step while no row is decoding


@dataclass
class Request:
    """One row's settings."""

    max_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: frozenset = frozenset()
    prompt_cache: Optional[PromptCache] = None
    # draft_filter(drafts [1, k], position [1]) -> drafts: replaces the drafter's tokens inside the
    # graph (benchmarks and tests inject acceptance with it; the drafter still runs)
    draft_filter: Optional[Callable] = None
    # log-probabilities of the emitted tokens (and this many alternatives, 0..20), from the
    # verification logits after processors: drafted tokens have them too
    logprobs: Optional[int] = None
    # a grammar the row's tokens must follow (its own matcher: one per row)
    constraint: Optional[Constraint] = None


@dataclass
class Event:
    """What one row emitted in one step; `finish_reason` ("stop", "length") on its last."""

    uid: int
    tokens: list
    from_draft: list
    finish_reason: Optional[str] = None
    # with Request.logprobs: per token (its log-probability, [(token, log-probability), ...])
    logprobs: Optional[list] = None
    error: Optional[str] = None  # with finish_reason "error": what the row's own code raised


@dataclass(eq=False)
class Row:
    uid: int
    prompt: list
    request: Request
    stats: Stats
    cache: list  # its own cache while it is prefilled; then its rows live in the batch's
    todo: list  # prompt tokens still to prefill
    offset: int  # tokens in its cache, as of the last round the host read
    emitted: list = field(default_factory=list)
    finish: Optional[str] = None
    error: Optional[str] = None  # what its own code (a logits processor) raised: the row ends with it
    started: float = 0.0
    images: tuple = ()  # images.ImageSpan per image of the prompt
    keys: list = field(default_factory=list)  # the prompt as the prompt cache keys it (images.cache_keys)
    soft: dict = field(default_factory=dict)  # span -> its soft tokens, for the spans still to prefill


@dataclass
class Batch:
    """The device state between rounds: row i of every array is the row `uids[i]`."""

    uids: list
    cache: list  # the target's caches; every layer's offset [B] is the position of `token`
    token: mx.array  # [B, 1] the last emitted token (not yet in the cache)
    hidden: mx.array  # [B, 1, H] the target's final-norm hidden state before it
    seeds: mx.array  # [B] uint32


@dataclass
class Round:
    k: int
    uids: list
    policy: object
    drafts: mx.array  # [B, k]
    tokens: mx.array  # [B, k + 1]: row i emits its first accepted[i] + 1
    accepted: mx.array  # [B]
    number: int = 0
    logprobs: Optional[tuple] = None  # (chosen [B, k+1], top ids [B, k+1, n], top values), if asked
    queue_seconds: float = 0.0  # how long async_eval took to queue it
    cold: bool = False  # a forward of it ran eagerly or was traced (Pair.cold_forwards): not timed


def draft_policies(pair: Pair, num_draft_tokens) -> DraftPolicies:
    """The policies for a K or "adaptive": the pair's adaptive ones, so what they learn carries
    over between calls (under mlx.launch they agree across the ranks: sharding.agreed_policies)."""
    if num_draft_tokens == "adaptive":
        return pair.adaptive
    return EveryBatch(FixedDraft(num_draft_tokens))


class Engine:
    """`policies` (adaptive.DraftPolicies) gives each round's K by batch size; by default, those
    of `num_draft_tokens` (`draft_policies`). Under mlx.launch every rank must choose the same K:
    a FixedDraft and the pair's adaptive policies do, a caller's own policy must."""

    def __init__(self, pair: Pair, num_draft_tokens="adaptive", prefill_step: int = PREFILL_STEP,
                 pipelined: bool = True, kv_quant=None, policies: Optional[DraftPolicies] = None):
        self.pair, self.view = pair, pair.view
        self.num_draft_tokens = check_draft_tokens(num_draft_tokens)
        self.policies = policies if policies is not None else draft_policies(pair, self.num_draft_tokens)
        self.prefill_step = prefill_step
        self.pipelined = pipelined  # False: read each round before building the next (to measure what it buys)
        self.kv_quant = kv_quant  # quantized_cache.KVQuant, or None: float caches
        self.rows: dict = {}  # uid -> Row, joined or waiting
        self.waiting: deque = deque()  # rows still to prefill, in order
        self.batch: Optional[Batch] = None
        self.queued: deque = deque()  # rounds submitted and not yet read
        # set to a list to record ("submit", round, start, graph built, queued, K) and ("read",
        # round, results ready)
        self.trace: Optional[list] = None
        self.rounds = 0  # rounds submitted so far
        self._uid = self._released = 0
        self._last_read = None
        self._after_cold = False  # the last round read had a warm-up forward

    # --- rows join and leave ------------------------------------------------------------------

    def insert(self, prompt: list, request: Request, images: tuple = ()) -> int:
        """Queue a prompt (token ids, checked by the caller) and its images (images.ImageSpan,
        prepared by the pair's ImageEncoder); returns the row's uid. The images the prompt cache
        does not already hold are encoded here (an MTPError if that fails: nothing has changed)."""
        keys = cache_keys(prompt, images) if images else list(prompt)
        cache_holder = request.prompt_cache or PromptCache(self.view.make_cache())
        reused = reuse_prompt_cache(self.pair, cache_holder, keys)
        soft = {span: self.pair.images.soft_tokens(span) for span in images if span.end > reused}
        uid, self._uid = self._uid, self._uid + 1
        stats = Stats()
        cache_holder.cache = self._kv(cache_holder.cache, reused)
        stats.prompt_tokens, stats.reused_prompt_tokens = len(prompt) - reused, reused
        request.prompt_cache = cache_holder
        row = Row(uid, list(prompt), request, stats, cache_holder.cache, list(prompt[reused:]), reused,
                  images=tuple(images), keys=keys, soft=soft)
        row.started = time.perf_counter()
        self.rows[uid] = row
        self.waiting.append(row)
        return uid

    def remove(self, uid: int) -> None:
        """Drop a row (a cancelled request); its prompt cache keeps what it holds now."""
        row = self.rows.get(uid)
        if row is not None:
            self._leave([row])

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    def step(self) -> list:
        """Prefill one chunk of a waiting row, queue a round, read the one before it."""
        with mx.stream(generation_stream):
            events = self._step()
        if self.rounds - self._released >= RELEASE_EVERY:
            self._released = self.rounds
            release_cache()
        return events

    def _step(self) -> list:
        if self.waiting:
            self._last_read = None  # the next read interval holds a prefill: it times no round
        events = self._prefill_chunk()
        if self.batch is not None and self._pipelined():
            self._submit()
        while self.queued and not any(u in self.rows for u in self.queued[0].uids):
            self.queued.popleft()  # every row of it has left: nothing to read
        if self.queued:
            events += self._read(self.queued.popleft())
        if self.batch is not None and not self.queued:
            self._submit()
        return events

    # --- prefill ------------------------------------------------------------------------------

    def _prefill_chunk(self) -> list:
        """Up to `prefill_step` prompt tokens of waiting rows (several short prompts, or one
        chunk of a long one); rows whose prompts are done pick their first token and join.
        Fresh rows with prompts of one length are prefilled together, as rows of one forward."""
        # while no row decodes, no row waits on prefill: take more at once (fewer, larger joins)
        budget = self.prefill_step * (1 if self.batch is not None else IDLE_PREFILL_CHUNKS)
        ready, events = [], []
        while self.waiting and budget > 0:
            row = self.waiting[0]
            group = self._same_length_group(budget)
            if group:
                n = len(row.todo)
                cache = self._kv(self.view.make_cache(len(group)), 0)
                reserve(cache, n)
                hidden = self.view.hidden(mx.array([r.todo for r in group], mx.uint32), cache)[:, -1:]
                for i, r in enumerate(group):
                    self.waiting.popleft()
                    r.todo, r.offset = [], n
                    r.cache = take_rows(cache, mx.array([i]))  # lazy: read only if it never joins
                budget -= n * len(group)
            else:
                # one forward takes at most prefill_step tokens: a long prompt's activations stay bounded
                take = min(budget, self.prefill_step)
                if row.images:  # an image is one forward: its tokens may attend to each other both ways
                    take = chunk_end(row.images, row.offset, row.offset + take) - row.offset
                chunk, row.todo = row.todo[:take], row.todo[take:]
                budget -= len(chunk)
                reserve(row.cache, row.offset + len(chunk))
                hidden = self._prefill_forward(row, chunk)[:, -1:]
                row.offset += len(chunk)
                row.cache = row.request.prompt_cache.cache = self._kv(row.cache, row.offset)
                if row.todo:
                    mx.eval([c.state for c in row.cache])
                    release_cache()  # a long prompt's activations, chunk by chunk (as mlx-lm does)
                    continue
                self.waiting.popleft()
                group, cache = [row], row.cache
            firsts = []
            for i, r in enumerate(group):
                try:
                    firsts.append(self._first_token(r, hidden[i : i + 1]))
                except Exception as e:  # the row's own processors or sampler: only this row ends
                    r.error = f"{type(e).__name__}: {e}"
                    firsts.append(None)
            ready.append((group, cache, hidden, firsts))
        if not ready:
            return events
        mx.eval([(hidden, [c.state for c in cache], [f for f in firsts if f]) for _, cache, hidden, firsts in ready])
        now, parts = time.perf_counter(), []
        for group, cache, hidden, firsts in ready:
            keep = []
            for i, (row, first) in enumerate(zip(group, firsts)):
                row.stats.prompt_seconds, row.started = now - row.started, now
                if first is None:
                    events.append(self._fail(row))
                    continue
                token, seed, lp = first
                if lp is not None:
                    chosen, ids, values = (x.tolist()[0][0] for x in lp)
                    lp = [(chosen, list(zip(ids, values)))]
                events.append(self._emit(row, [token.item()], [False], lp))
                if row.finish is None:
                    keep.append(i)
            if keep:
                rows = [group[i] for i in keep]
                if len(keep) < len(group):
                    cache, hidden = take_rows(cache, mx.array(keep)), mx.take(hidden, mx.array(keep), axis=0)
                parts.append(([r.uid for r in rows], cache, mx.concatenate([firsts[i][0] for i in keep]), hidden,
                              mx.concatenate([firsts[i][1] for i in keep])))
        if parts:
            self._join(parts)
        return events

    def _prefill_forward(self, row: Row, chunk: list) -> mx.array:
        """The target's hidden states for a chunk of the row's prompt at its offset: token
        embeddings, and the soft tokens of the images in it (whose positions take the pad id)."""
        start, end = row.offset, row.offset + len(chunk)
        spans = spans_in(row.images, start, end)
        if not spans:
            return self.view.hidden(mx.array(chunk, mx.uint32)[None], row.cache)
        info = self.pair.images.info
        ids = list(chunk)
        for s in spans:
            ids[s.start - start : s.end - start] = [info.pad_id] * (s.end - s.start)
        tokens = mx.array(ids, mx.uint32)[None]
        embeddings = self.view.image_embeddings(tokens, [(s.start - start, row.soft.pop(s)) for s in spans])
        if info.every_layer_blocks is not None:
            set_blocks(row.cache, Blocks(tuple((s.start, s.end) for s in spans), info.every_layer_blocks))
        try:
            return self.view.hidden(tokens, row.cache, embeddings)
        finally:
            set_blocks(row.cache, None)

    def _same_length_group(self, budget: int) -> list:
        """Waiting rows from the front that are fresh (nothing cached) with prompts of the first
        one's length, as many as the budget takes; [] unless there are at least two."""
        first = self.waiting[0]
        n = len(first.todo)
        group = []
        for row in self.waiting:
            if row.offset or row.images or len(row.todo) != n or n * (len(group) + 1) > budget:
                break
            group.append(row)
        return group if len(group) > 1 else []

    def _first_token(self, row: Row, hidden: mx.array) -> tuple:
        sampling = row.request.sampling
        if sampling.sampler is not None and sampling.seed is not None:
            mx.random.seed(sampling.seed)  # custom samplers draw from MLX's global generator
        logits = self.view.logits(hidden)[:, 0]
        if sampling.logits_processors:
            logits = process(sampling, logits, mx.array(row.prompt, mx.int32))
        if row.request.constraint is not None:
            logits = apply_masks(logits, mx.array(row.request.constraint.mask()[None]))
        seed = mx.array([sampling.seed or 0], mx.uint32)
        token = strategy_of(sampling).first(logits, seed, mx.array([len(row.prompt)]))[:, None]
        n = row.request.logprobs
        return token, seed, None if n is None else _logprobs(logits[:, None], token, n)

    def _join(self, parts: list) -> None:
        """Parts (uids, cache, token, hidden, seed) of rows whose prompts are done join the batch."""
        b = self.batch
        parts = ([] if b is None else [(b.uids, b.cache, b.token, b.hidden, b.seeds)]) + parts
        uids, caches, tokens, hiddens, seeds = zip(*parts)
        self.batch = Batch(
            [u for part in uids for u in part], concat_rows(caches), mx.concatenate(tokens),
            mx.concatenate(hiddens), mx.concatenate(seeds),
        )

    def _leave(self, rows: list) -> None:
        """Rows that stopped or were removed: settle their prompt caches, drop their batch rows."""
        gone = {r.uid for r in rows}
        b = self.batch
        for row in rows:
            del self.rows[row.uid]
            if row in self.waiting:  # its cache holds the part of the prompt prefilled so far
                self.waiting.remove(row)
                row.request.prompt_cache.tokens = row.keys[: row.offset]
                continue
            row.stats.generation_seconds = time.perf_counter() - row.started
            row.stats.peak_memory_bytes = mx.get_peak_memory()
            # the cache holds the prompt and every emitted token but the last (the next input)
            kept = row.keys + row.emitted[:-1]
            cache = row.cache if b is None or row.uid not in b.uids else take_rows(b.cache, mx.array([b.uids.index(row.uid)]))
            set_offset(cache, mx.array([len(kept)], mx.int32))
            row.request.prompt_cache.cache, row.request.prompt_cache.tokens = cache, kept
        if b is not None and gone & set(b.uids):
            keep = [i for i, u in enumerate(b.uids) if u not in gone]
            if not keep:
                self.batch = None
                return
            at = mx.array(keep)
            self.batch = Batch(
                [b.uids[i] for i in keep], take_rows(b.cache, at), mx.take(b.token, at, axis=0),
                mx.take(b.hidden, at, axis=0), mx.take(b.seeds, at, axis=0),
            )

    def _kv(self, cache: list, offset: int) -> list:
        """The cache quantized when the settings ask for it: from the first token with
        quantized_kv_start 0, else once `offset` (every row's, for a batch) passes it."""
        q = self.kv_quant
        if q is None or is_quantized(cache) or (q.start and offset <= q.start):
            return cache
        return quantize_cache(cache, q)

    # --- rounds -------------------------------------------------------------------------------

    def _pipelined(self) -> bool:
        return self.pipelined and not any(self.rows[u].request.sampling.logits_processors
                                          or self.rows[u].request.constraint for u in self.batch.uids)

    def _submit(self) -> None:
        start = time.perf_counter()
        b = self.batch
        rows = [self.rows[u] for u in b.uids]
        b.cache = self._kv(b.cache, min(r.offset for r in rows))
        policy = self.policies.for_batch(len(rows))
        # never draft past every row's max_tokens: a round emits at most k + 1 tokens per row
        room = min(MAX_DRAFT_TOKENS, max(r.request.max_tokens - len(r.emitted) - 1 for r in rows))
        k = max(0, policy.choose(room)) if self.pair.drafter is not None and room > 0 else 0
        in_flight = sum(r.k + 1 for r in self.queued)
        reserve(b.cache, max(r.offset for r in rows) + in_flight + k + 1)
        cold = self.pair.cold_forwards
        rnd = build_round(self.pair, b, rows, k)
        rnd.policy, rnd.number, rnd.cold = policy, self.rounds + 1, self.pair.cold_forwards != cold
        built = time.perf_counter()
        mx.async_eval(rnd.tokens, rnd.accepted, rnd.drafts, rnd.logprobs, b.token, b.hidden, [c.state for c in b.cache])
        rnd.queue_seconds = time.perf_counter() - built
        self.queued.append(rnd)
        self.rounds += 1
        if self.trace is not None:
            self.trace.append(("submit", self.rounds, start, built, time.perf_counter(), k))

    def _read(self, rnd: Round) -> list:
        """The round's one host synchronization; returns each live row's event."""
        mx.eval(rnd.accepted, rnd.tokens, rnd.drafts, rnd.logprobs)
        accepted, tokens, drafts = rnd.accepted.tolist(), rnd.tokens.tolist(), rnd.drafts.tolist()
        logprobs = None if rnd.logprobs is None else [x.tolist() for x in rnd.logprobs]
        now = time.perf_counter()
        seconds = None if self._last_read is None else now - self._last_read
        self._last_read = now
        newer = self.queued[-1] if self.queued else None
        if rnd.cold or self._after_cold or (newer is not None and newer.cold):
            # a warm-up forward in the interval: this round's, the next one's (or its trace), or
            # the last one's (on MLX's CPU a read interval can hold the end of the round before)
            seconds = None
        self._after_cold = rnd.cold
        if seconds is not None and newer is not None and newer.queue_seconds > seconds / 4:
            # Queuing the next round waited for much of the interval (MLX's CPU: async_eval returns
            # only when little of a graph is left to run, measured), so the interval holds part of
            # this round and part of that one: it times a K only when both rounds drafted that K
            # for as many rows. Otherwise (a GPU) it is this round's own.
            if newer.k != rnd.k or len(newer.uids) != len(rnd.uids):
                seconds = None
        if self.trace is not None:
            self.trace.append(("read", rnd.number, now))
        live = [i for i, u in enumerate(rnd.uids) if u in self.rows and self.rows[u].finish is None]
        rnd.policy.observe(rnd.k, [accepted[i] for i in live], seconds)
        events, stopped = [], []
        for i in live:
            row, a = self.rows[rnd.uids[i]], accepted[i]
            if row.error is not None:
                events.append(self._fail(row))
                stopped.append(row)
                continue
            row.offset += a + 1
            row.stats.record(drafts[i], a, seconds)
            lp = None
            if logprobs is not None and row.request.logprobs is not None:
                chosen, ids, values = (x[i] for x in logprobs)
                n = row.request.logprobs
                lp = [(chosen[j], list(zip(ids[j][:n], values[j][:n]))) for j in range(a + 1)]
            events.append(self._emit(row, tokens[i][: a + 1], [j < a for j in range(a + 1)], lp))
            if row.finish is not None:
                stopped.append(row)
        if stopped:
            self._leave(stopped)
        return events

    def _fail(self, row: Row) -> Event:
        row.finish = "error"
        if row.uid in self.rows and (self.batch is None or row.uid not in self.batch.uids):
            self._leave([row])
        return Event(row.uid, [], [], "error", error=row.error)

    def _emit(self, row: Row, tokens: list, from_draft: list, logprobs: Optional[list] = None) -> Event:
        """Append tokens to the row up to its first stop (EOS id or max_tokens)."""
        eos, limit = row.request.eos_ids, row.request.max_tokens
        for n, t in enumerate(tokens):
            row.emitted.append(t)
            if t in eos or len(row.emitted) >= limit:
                row.finish = "stop" if t in eos else "length"
                tokens, from_draft = tokens[: n + 1], from_draft[: n + 1]
                logprobs = None if logprobs is None else logprobs[: n + 1]
                break
        row.stats.generated_tokens = len(row.emitted)
        if row.request.constraint is not None and row.error is None:
            row.error = row.request.constraint.advance(tokens)
        if row.finish is not None and row.uid in self.rows and row not in self.waiting:
            if self.batch is None or row.uid not in self.batch.uids:
                self._leave([row])  # stopped at its first token: it never joined
        return Event(row.uid, tokens, from_draft, row.finish, logprobs)


# --- one round as one lazy graph -----------------------------------------------------------------


def _groups(rows: list) -> list:
    """(strategy, batch indices) per group of rows that decide their tokens the same way."""
    groups = {}
    for i, row in enumerate(rows):
        key = group_key(row.request.sampling)
        if key not in groups:
            groups[key] = (strategy_of(row.request.sampling), [])
        groups[key][1].append(i)
    return list(groups.values())


def _by_group(groups: list, size: int, fn) -> list:
    """Run fn(strategy, index array or None) per group; stitch each output back in row order."""
    if len(groups) == 1:
        return list(fn(groups[0][0], None))
    order = [i for _, rows in groups for i in rows]
    parts = [fn(s, mx.array(rows)) for s, rows in groups]
    inverse = mx.array(sorted(range(size), key=order.__getitem__))
    out = []
    for part in zip(*parts):
        like = next(p for p in part if p is not None) if any(p is not None for p in part) else None
        if like is None:
            out.append(None)
            continue
        # a group without this output (greedy rows have no log q) gets zeros: nothing reads them
        part = [p if p is not None else mx.zeros((len(rows), *like.shape[1:]), like.dtype)
                for p, (_, rows) in zip(part, groups)]
        out.append(mx.take(mx.concatenate(part, axis=0), inverse, axis=0))
    return out


def _rows_of(x, at):
    return x if at is None or x is None else mx.take(x, at, axis=0)


def draft_block(pair: Pair, batch: Batch, groups: list, position: mx.array, k: int) -> tuple:
    """K drafts [B, k] and, when any row samples by rejection, the drafter's log q [B, k, V]."""
    step = pair.draft_step()
    kv, masks = pair.view.shared_kv(batch.cache, pair.drafter.args.sliding_window + 1)
    token, hidden = batch.token, batch.hidden
    greedy_only = not any(s.samples_drafts for s, _ in groups)
    drafts, log_q = [], []
    for j in range(k):
        greedy, h, hidden = step(token, hidden, kv, masks, position)
        if greedy_only:
            token = greedy
        else:
            token, q = _by_group(
                groups, token.shape[0],
                lambda s, at: s.draft(_rows_of(h, at), _rows_of(greedy, at), pair.drafter,
                                      _rows_of(batch.seeds, at), _rows_of(position, at), j),
            )
            log_q.append(q)
        drafts.append(token)
    log_q = None if greedy_only else mx.stack(log_q, axis=1)
    return mx.concatenate(drafts, axis=1), log_q


def build_round(pair: Pair, batch: Batch, rows: list, k: int) -> Round:
    """Draft, verify and accept for every row, lazily; moves `batch` to the state after it."""
    B = len(rows)
    position = batch.cache[0].offset  # [B]: the position of each row's last token
    groups = _groups(rows)
    drafts, log_q = mx.zeros((B, 0), mx.int32), None
    if k:
        drafts, log_q = draft_block(pair, batch, groups, position, k)
        if any(r.request.draft_filter for r in rows):
            drafts = mx.concatenate([
                r.request.draft_filter(drafts[i : i + 1], position[i : i + 1]) if r.request.draft_filter
                else drafts[i : i + 1] for i, r in enumerate(rows)
            ])
    masks = None
    if any(r.request.constraint for r in rows):
        masks, drafts, log_q = _constrained(rows, drafts, log_q, k)
    verified, logits = pair.verify(mx.concatenate([batch.token, drafts], axis=1), batch.cache)
    if any(r.request.sampling.logits_processors for r in rows):
        logits = mx.concatenate([_processed(r, logits[i : i + 1], drafts[i]) for i, r in enumerate(rows)])
    if masks is not None:
        logits = apply_masks(logits, masks)
    if log_q is None and any(s.samples_drafts for s, _ in groups):
        log_q = mx.zeros((B, k, 1))  # no rejection row drafted (k == 0)
    accepted, tokens = _by_group(
        groups, B,
        lambda s, at: s.verify(_rows_of(logits, at), _rows_of(drafts, at), _rows_of(log_q, at),
                               _rows_of(batch.seeds, at), _rows_of(position, at)),
    )
    set_offset(batch.cache, position + accepted + 1)
    batch.token = mx.take_along_axis(tokens, accepted[:, None], axis=1)
    batch.hidden = mx.take_along_axis(verified, accepted[:, None, None], axis=1)
    wanted = [r.request.logprobs for r in rows if r.request.logprobs is not None]
    logprobs = _logprobs(logits, tokens, max(wanted)) if wanted else None
    return Round(k, list(batch.uids), None, drafts, tokens, accepted, logprobs=logprobs)


def _logprobs(logits: mx.array, tokens: mx.array, top: int) -> tuple:
    """The emitted tokens' log-probabilities [B, k+1] and the `top` most likely [B, k+1, top]."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    if top == 0:
        empty = mx.zeros((*tokens.shape, 0))
        return chosen, empty.astype(mx.int32), empty
    ids = mx.argpartition(-lp, kth=top - 1, axis=-1)[..., :top]
    values = mx.take_along_axis(lp, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)  # most likely first
    return chosen, mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def _constrained(rows: list, drafts: mx.array, log_q, k: int) -> tuple:
    """The verification masks [B, k+1, W] of the constrained rows (unconstrained rows: all
    allowed), and the drafts (and log q) with forced tokens in place. Reads the drafts: the one
    extra synchronization of a round with constrained rows."""
    host = drafts.tolist() if k else [[] for _ in rows]  # evaluates the drafter's block
    words, forced, any_forced = [], [], False
    for i, row in enumerate(rows):
        c = row.request.constraint
        if c is None:
            words.append(None)
            forced.append([-1] * k)
            continue
        m = c.round_masks(host[i])
        words.append(m.words)
        host[i], any_forced = m.drafts, any_forced or any(f >= 0 for f in m.forced)
        forced.append(m.forced)
    width = next(w.shape[1] for w in words if w is not None)
    full = np.full((k + 1, width), -1, np.int32)
    masks = mx.array(np.stack([full if w is None else w for w in words]))
    if any_forced:
        drafts = mx.array(host, mx.int32).reshape(len(rows), k)
        if log_q is not None:
            # a forced draft was "drawn" from a point mass: its ratio p / q is 1 (p is a point mass too)
            f = mx.array(forced, mx.int32)[..., None]
            point = mx.where(mx.arange(log_q.shape[-1]) == f, 0.0, -float("inf")).astype(log_q.dtype)
            log_q = mx.where(f >= 0, point, log_q)
    return masks, drafts, log_q


def _processed(row: Row, logits: mx.array, drafts: mx.array) -> mx.array:
    """One row's logits [1, k+1, V] after its processors; position i sees the drafts before it.
    A processor that raises ends its own row (read with the round), not the batch."""
    seen = mx.concatenate([mx.array(row.prompt + row.emitted, mx.int32), drafts])
    n = len(row.prompt) + len(row.emitted)
    sampling = row.request.sampling
    try:
        out = mx.stack([process(sampling, logits[:, i], seen[: n + i]) for i in range(logits.shape[1])], axis=1)
        if out.shape != logits.shape:
            raise ValueError(f"a logits processor returned shape {out.shape}, expected {logits.shape}")
        return out
    except Exception as e:
        row.error = f"{type(e).__name__}: {e}"
        return logits


# --- one row: the single-stream interface ------------------------------------------------------


def generate_tokens(
    pair: Pair,
    prompt: list,
    max_tokens: int,
    num_draft_tokens=4,
    eos_ids=(),
    stats: Optional[Stats] = None,
    sampling: Optional[Sampling] = None,
    prompt_cache: Optional[PromptCache] = None,
    draft_filter: Optional[Callable] = None,
) -> Iterator[tuple]:
    """Yield (token, from_draft) for one prompt, stopping exactly at max_tokens or an EOS id.

    The engine with one row. `stats` (a Stats) is filled in place; `prompt_cache` holds every
    token of prompt + output except the last one afterwards. `num_draft_tokens`: K, "adaptive",
    or a policy object (choose(max_k) -> k, observe(k, accepted, seconds)).
    """
    if max_tokens <= 0:
        return
    own = not isinstance(num_draft_tokens, (int, str))
    engine = Engine(pair, 0 if own else num_draft_tokens, policies=EveryBatch(num_draft_tokens) if own else None)
    request = Request(max_tokens, sampling or Sampling(), frozenset(eos_ids), prompt_cache, draft_filter)
    uid = engine.insert(prompt, request)
    row = engine.rows[uid]
    if stats is not None:
        row.stats = stats
        stats.prompt_tokens, stats.reused_prompt_tokens = len(prompt) - row.offset, row.offset
    try:
        while engine.busy:
            for event in engine.step():
                for token, from_draft in zip(event.tokens, event.from_draft):
                    yield token, from_draft
    finally:
        engine.remove(uid)
