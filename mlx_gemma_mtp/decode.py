"""The speculative decode loop.

Each round drafts K tokens, verifies [last, d1..dK] in one target forward and decides how many
drafts to keep, all as one lazy MLX graph with one host synchronization. K = 0 is plain
decoding through the same code, pipelined like mlx-lm: with nothing to roll back, the next
round is queued before the current one is read.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .drafter import Drafter
from .errors import MTPError
from .sampling import Sampling, draw, log_distribution, process, rejection_round
from .target import TargetView, target_view

from .limits import MAX_DRAFT_TOKENS

PREFILL_STEP = 2048
# Sliding caches keep this many tokens beyond the window, enough to roll back two rounds.
CACHE_SLACK = 2 * MAX_DRAFT_TOKENS + 4


@dataclass
class Pair:
    target: nn.Module  # mlx-lm Gemma 4 model
    drafter: Optional[Drafter] = None
    adaptive: Optional[object] = field(default=None, repr=False)  # the API's adaptive draft policy
    compile_draft: bool = True  # run the draft step through mx.compile (False: eager)
    target_config: Optional[dict] = field(default=None, repr=False)  # normalized (config.py)
    draft_config: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        self.view: TargetView = target_view(self.target)
        self._compiled_step = None

    def compiled_step(self):
        """The drafter's step as one compiled graph: (token [1, 1], hidden, K/V buffers, masks,
        position array) -> (greedy token, normed h, projected hidden). The weights are inputs of
        the compiled function, so reloaded or trained weights are seen."""
        if self._compiled_step is None:
            drafter, view = self.drafter, self.view

            def step(token, hidden, kv, masks, position):
                h, hidden = drafter.step(view.embed(token), hidden, kv, masks, position)
                return drafter.greedy_token(h), h, hidden

            self._compiled_step = mx.compile(step, inputs=[drafter.state, view.text.model.embed_tokens.state])
        return self._compiled_step


@dataclass
class PromptCache:
    """The target's KV cache and the tokens it holds, reusable across calls (multi-turn chat)."""

    cache: list
    tokens: list = field(default_factory=list)


def make_prompt_cache(pair: Pair) -> PromptCache:
    return PromptCache(pair.view.make_cache(CACHE_SLACK))


@dataclass
class Stats:
    prompt_tokens: int = 0  # prompt tokens processed (not counting those the prompt cache held)
    reused_prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    drafted_per_position: list = field(default_factory=list)
    accepted_per_position: list = field(default_factory=list)
    round_log: list = field(default_factory=list)  # (drafted token ids, accepted count) per round
    round_seconds: list = field(default_factory=list)  # wall time of each round, host work included
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def acceptance_per_position(self) -> list:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tokens_per_round(self) -> float:
        return (self.generated_tokens - 1) / self.rounds if self.rounds else 0.0

    def record(self, drafts: list, accepted: int, seconds: float) -> None:
        self.rounds += 1
        self.round_seconds.append(seconds)
        if drafts:
            self.round_log.append((drafts, accepted))
        grow = len(drafts) - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(len(drafts)):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < accepted


@dataclass
class Round:
    """One lazily built round and the arrays the host reads after its sync."""

    k: int
    drafts: mx.array  # [1, k]
    tokens: mx.array  # [1, k + 1]: the first accepted + 1 are emitted
    accepted: mx.array  # [1]
    hidden: mx.array  # [1, k + 1, H], final-norm hidden states of the verified positions


class FixedDraft:
    """The draft-length policy for a constant K."""

    def __init__(self, k: int):
        self.k = k

    def choose(self, max_k: int) -> int:
        return min(self.k, max_k)

    def observe(self, k: int, accepted: int, seconds: float) -> None:
        pass


def prefill(view: TargetView, prompt: mx.array, cache: list) -> mx.array:
    """Run the prompt through the target; returns the last position's hidden state [1, 1, H]."""
    while prompt.size > PREFILL_STEP:
        view.hidden(prompt[None, :PREFILL_STEP], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[PREFILL_STEP:]
    return view.hidden(prompt[None], cache)[:, -1:]


def pick(sampling: Sampling, logits: mx.array, history, position: int) -> mx.array:
    """The target's token [1, 1] from one position's logits [1, V] (the first generated token)."""
    logits = process(sampling, logits, history)
    if sampling.greedy:
        return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
    if sampling.sampler is not None:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampling.sampler(logprobs).reshape(1, 1).astype(mx.int32)
    return draw(log_distribution(sampling, logits), sampling.seed, position, "bonus")[:, None]


def round_draft_step(pair: Pair, cache: list, position: int) -> Callable:
    """This round's draft step: (token, hidden) -> (greedy token, h, projected hidden)."""
    view, drafter = pair.view, pair.drafter
    window = drafter.args.sliding_window + 1
    if pair.compile_draft:
        kv, masks = view.shared_kv_bucketed(cache, window)
        step, at = pair.compiled_step(), mx.array(position, mx.int32)
        return lambda token, hidden: step(token, hidden, kv, masks, at)
    kv = view.shared_kv(cache, window)

    def eager(token, hidden):
        h, hidden = drafter(view.embed(token), hidden, kv, position)
        return drafter.greedy_token(h), h, hidden  # lazy: the greedy token costs only if used

    return eager


def draft_block(pair: Pair, token, hidden, cache, k: int, sampling: Sampling, history):
    """K drafts [1, k] (and the drafter's log q per draft when sampling by rejection); the
    query position stays at the last token's for the whole block."""
    drafter = pair.drafter
    position = cache[pair.view.producers["full_attention"]].offset
    step = round_draft_step(pair, cache, position)
    rejection = not sampling.greedy and sampling.sampler is None
    drafts, log_q = [], []
    for j in range(k):
        greedy, h, hidden = step(token, hidden)
        if not rejection:
            token = greedy
        else:
            logits = drafter.logits(h)[:, 0]
            if sampling.logits_processors:
                past = mx.concatenate([history, *[d[0] for d in drafts]])
                logits = process(sampling, logits, past)
            log_q.append(log_distribution(sampling, logits))
            token = draw(log_q[-1], sampling.seed, position + 1 + j, "draft")[:, None]
        drafts.append(token)
    return mx.concatenate(drafts, axis=1), log_q


def build_round(pair, token, hidden, cache, k, sampling, history, draft_filter=None) -> Round:
    view = pair.view
    position = cache[view.producers["full_attention"]].offset  # of `token`
    drafts, log_q = mx.zeros((1, 0), mx.int32), []
    if k:
        drafts, log_q = draft_block(pair, token, hidden, cache, k, sampling, history)
        if draft_filter is not None:
            drafts = draft_filter(drafts, position)
    verified = view.hidden(mx.concatenate([token, drafts], axis=1), cache)
    logits = view.logits(verified)
    if sampling.logits_processors:  # each position sees the tokens before it, drafts included
        seen = mx.concatenate([history, drafts[0]])
        logits = mx.stack(
            [process(sampling, logits[:, i], seen[: history.size + i]) for i in range(k + 1)], axis=1
        )
    if not sampling.greedy and sampling.sampler is None:
        log_p = [log_distribution(sampling, logits[:, i]) for i in range(k + 1)]
        accepted, tokens = rejection_round(sampling, drafts, log_q, log_p, position)
        return Round(k, drafts, tokens, accepted, verified)
    if sampling.greedy:
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    else:
        tokens = sampling.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.int32)
    matches = (drafts == tokens[:, :-1]).astype(mx.int32)
    return Round(k, drafts, tokens, mx.cumprod(matches, axis=1).sum(axis=1), verified)


def read_round(rnd: Round) -> tuple[int, list, list]:
    """The round's one host synchronization: accepted count, emitted tokens, drafts."""
    mx.eval(rnd.accepted, rnd.tokens, rnd.drafts)
    accepted = rnd.accepted.tolist()[0]
    return accepted, rnd.tokens.tolist()[0][: accepted + 1], rnd.drafts.tolist()[0]


def reuse_prompt_cache(pair: Pair, prompt_cache: PromptCache, prompt: list) -> int:
    """Trim the cache to its longest prefix shared with `prompt` (keeping at least the last prompt
    token to process) and return that length; a cache that cannot be trimmed so far is reset."""
    held, common = prompt_cache.tokens, 0
    limit = min(len(held), len(prompt) - 1)
    while common < limit and held[common] == prompt[common]:
        common += 1
    drop = len(held) - common
    if drop and (common == 0 or not all(_can_trim(c, drop) for c in prompt_cache.cache)):
        prompt_cache.cache, prompt_cache.tokens = pair.view.make_cache(CACHE_SLACK), []
        return 0
    for c in prompt_cache.cache:
        c.trim(drop)
    prompt_cache.tokens = held[:common]
    return common


def _can_trim(cache, n: int) -> bool:
    return n <= getattr(cache, "slack", n)


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
) -> Iterator[tuple[int, bool]]:
    """Yield (token, from_draft) and stop exactly at max_tokens or an EOS id.

    num_draft_tokens: an int, or a policy with choose(max_k) -> k and observe(k, accepted, seconds).
    prompt_cache: its tokens that start `prompt` are not recomputed; afterwards it holds every
    token of prompt + output except the last one.
    draft_filter(drafts [1, k], position) -> drafts: replaces the drafter's tokens inside the graph
    (benchmarks inject acceptance with it; the drafter still runs).
    """
    stats = stats if stats is not None else Stats()
    sampling = sampling if sampling is not None else Sampling()
    policy = FixedDraft(num_draft_tokens) if isinstance(num_draft_tokens, int) else num_draft_tokens
    can_draft = pair.drafter is not None
    eos_ids = set(eos_ids)
    view = pair.view
    if max_tokens <= 0:
        return
    prompt_cache = prompt_cache if prompt_cache is not None else make_prompt_cache(pair)
    emitted = []
    mx.reset_peak_memory()

    if sampling.sampler is not None and sampling.seed is not None:
        mx.random.seed(sampling.seed)  # custom samplers draw from MLX's global generator
    start = time.perf_counter()
    reused = reuse_prompt_cache(pair, prompt_cache, prompt)
    cache = prompt_cache.cache
    stats.prompt_tokens, stats.reused_prompt_tokens = len(prompt) - reused, reused
    history = mx.array(prompt, mx.int32) if sampling.logits_processors else None
    hidden = prefill(view, mx.array(prompt[reused:], mx.uint32), cache)
    token = pick(sampling, view.logits(hidden)[:, 0], history, len(prompt))
    mx.eval(token, hidden)
    first = token.item()
    stats.prompt_seconds = time.perf_counter() - start
    start = last_read = time.perf_counter()

    def next_k(emitted_count: int) -> int:
        # asked once per round; never draft past max_tokens: a round emits at most k + 1 tokens
        room = min(MAX_DRAFT_TOKENS, max_tokens - emitted_count - 1)
        return max(0, policy.choose(room)) if can_draft and room > 0 else 0

    def extend(history, tokens):
        return None if history is None else mx.concatenate([history, tokens])

    try:
        emitted.append(first)
        stats.generated_tokens = 1
        yield first, False
        if first in eos_ids or len(emitted) >= max_tokens:
            return
        history = extend(history, token[0])
        pending = build_round(pair, token, hidden, cache, next_k(len(emitted)), sampling, history, draft_filter)
        mx.async_eval(pending.tokens, pending.accepted, pending.drafts)
        queued = None
        while True:
            rnd = pending
            # a plain round emits exactly one token, so the next K can be chosen before reading it
            k = next_k(len(emitted) + 1) if rnd.k == 0 else None
            if k == 0 and len(emitted) + 1 < max_tokens:
                # plain decoding: nothing to roll back, so queue the next round before reading this one
                queued = build_round(
                    pair, rnd.tokens, rnd.hidden, cache, 0, sampling, extend(history, rnd.tokens[0]), draft_filter
                )
                mx.async_eval(queued.tokens, queued.accepted)
            accepted, tokens, drafts = read_round(rnd)
            now = time.perf_counter()
            stats.record(drafts, accepted, now - last_read)
            policy.observe(rnd.k, accepted, now - last_read)
            last_read = now
            if queued is None:
                for c in cache:
                    c.trim(rnd.k - accepted)
            for i, t in enumerate(tokens):
                emitted.append(t)
                stats.generated_tokens = len(emitted)
                yield t, i < accepted
                if t in eos_ids or len(emitted) >= max_tokens:
                    return
            history = extend(history, mx.array(tokens, mx.int32)) if queued is None else extend(history, rnd.tokens[0])
            if queued is not None:
                pending, queued = queued, None
            else:
                last = slice(accepted, accepted + 1)
                k = next_k(len(emitted)) if k is None else k
                pending = build_round(
                    pair, rnd.tokens[:, last], rnd.hidden[:, last], cache, k, sampling, history, draft_filter
                )
                mx.async_eval(pending.tokens, pending.accepted, pending.drafts)
    finally:
        stats.generation_seconds = time.perf_counter() - start
        stats.peak_memory_bytes = mx.get_peak_memory()
        settle_prompt_cache(pair, prompt_cache, prompt + emitted[:-1] if emitted else prompt)


def settle_prompt_cache(pair: Pair, prompt_cache: PromptCache, tokens: list) -> None:
    """Leave the cache holding exactly `tokens` (undo work queued past the last emitted token)."""
    cache = prompt_cache.cache
    offset = cache[pair.view.producers["full_attention"]].offset
    extra = offset - len(tokens)
    if extra < 0 or not all(_can_trim(c, extra) for c in cache):
        prompt_cache.cache, prompt_cache.tokens = pair.view.make_cache(CACHE_SLACK), []
        return
    for c in cache:
        c.trim(extra)
    prompt_cache.tokens = list(tokens)
