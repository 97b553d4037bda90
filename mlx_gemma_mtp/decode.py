"""The speculative decode loop.

Each round drafts K tokens, verifies [last, d1..dK] in one target forward and counts the
accepted drafts, all as one lazy MLX graph with one host synchronization. K = 0 is plain
decoding through the same code, pipelined like mlx-lm: with nothing to roll back, the next
round is queued before the current one is read.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .drafter import Drafter
from .target import TargetView, target_view

PREFILL_STEP = 2048


@dataclass
class Pair:
    target: nn.Module  # mlx-lm Gemma 4 model
    drafter: Optional[Drafter] = None

    def __post_init__(self):
        self.view: TargetView = target_view(self.target)


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    drafted_per_position: list = field(default_factory=list)
    accepted_per_position: list = field(default_factory=list)
    round_log: list = field(default_factory=list)  # (drafted token ids, accepted count) per round
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

    def record(self, drafts: list, accepted: int) -> None:
        self.rounds += 1
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
    """One lazily built round: its inputs' K and the arrays the host reads after the sync."""

    k: int
    drafts: mx.array  # [1, k]
    target_tokens: mx.array  # [1, k + 1], the target's greedy token after each verified position
    accepted: mx.array  # [1], leading drafts equal to the target's tokens
    hidden: mx.array  # [1, k + 1, H], final-norm hidden states of the verified positions


def prefill(view: TargetView, prompt: mx.array, cache: list) -> mx.array:
    """Run the prompt through the target; returns the last position's hidden state [1, 1, H]."""
    while prompt.size > PREFILL_STEP:
        view.hidden(prompt[None, :PREFILL_STEP], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[PREFILL_STEP:]
    return view.hidden(prompt[None], cache)[:, -1:]


def draft_block(pair: Pair, token: mx.array, hidden: mx.array, cache: list, k: int) -> mx.array:
    """K greedy drafts [1, k]; the query position stays at the last token's for the whole block."""
    view, drafter = pair.view, pair.drafter
    kv = view.shared_kv(cache, drafter.args.sliding_window + 1)
    position = cache[view.producers["full_attention"]].offset
    drafts = []
    for _ in range(k):
        h, hidden = drafter(view.embed(token), hidden, kv, position)
        token = drafter.greedy_token(h)
        drafts.append(token)
    return mx.concatenate(drafts, axis=1)


def build_round(pair: Pair, token: mx.array, hidden: mx.array, cache: list, k: int) -> Round:
    view = pair.view
    drafts = draft_block(pair, token, hidden, cache, k) if k else mx.zeros((1, 0), mx.int32)
    verified = view.hidden(mx.concatenate([token, drafts.astype(token.dtype)], axis=1), cache)
    target_tokens = mx.argmax(view.logits(verified), axis=-1).astype(mx.int32)
    matches = (drafts == target_tokens[:, :-1]).astype(mx.int32)
    accepted = mx.cumprod(matches, axis=1).sum(axis=1)
    return Round(k, drafts, target_tokens, accepted, verified)


def read_round(rnd: Round) -> tuple[int, list, list]:
    """The round's one host synchronization: accepted count, emitted tokens, drafts."""
    mx.eval(rnd.accepted, rnd.target_tokens, rnd.drafts)
    accepted = rnd.accepted.tolist()[0]
    return accepted, rnd.target_tokens.tolist()[0][: accepted + 1], rnd.drafts.tolist()[0]


def generate_tokens(
    pair: Pair,
    prompt: mx.array,
    max_tokens: int,
    num_draft_tokens: int = 4,
    eos_ids=(),
    stats: Optional[Stats] = None,
) -> Iterator[tuple[int, bool]]:
    """Greedy decoding; yields (token, from_draft) and stops exactly at max_tokens or an EOS id."""
    stats = stats if stats is not None else Stats()
    k_max = num_draft_tokens if pair.drafter is not None else 0
    eos_ids = set(eos_ids)
    view = pair.view
    cache = view.make_cache(slack=k_max + 2)
    mx.reset_peak_memory()

    start = time.perf_counter()
    stats.prompt_tokens = prompt.size
    hidden = prefill(view, prompt, cache)
    token = mx.argmax(view.logits(hidden), axis=-1).astype(mx.int32)
    mx.eval(token, hidden)
    first = token.item()
    stats.prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()

    emitted = 0

    def finish():
        stats.generation_seconds = time.perf_counter() - start
        stats.peak_memory_bytes = mx.get_peak_memory()

    if max_tokens <= 0:
        return finish()
    emitted, stats.generated_tokens = 1, 1
    yield first, False
    if first in eos_ids or emitted >= max_tokens:
        return finish()

    def next_k():
        # never draft past max_tokens: a round emits at most k + 1 tokens
        return max(0, min(k_max, max_tokens - emitted - 1))

    pending = build_round(pair, token, hidden, cache, next_k())
    mx.async_eval(pending.target_tokens, pending.accepted, pending.drafts)
    queued = None
    while True:
        rnd = pending
        if rnd.k == 0 and next_k() == 0 and emitted + 1 < max_tokens:
            # plain decoding: nothing to roll back, so queue the next round before reading this one
            queued = build_round(pair, rnd.target_tokens, rnd.hidden, cache, 0)
            mx.async_eval(queued.target_tokens, queued.accepted)
        accepted, tokens, drafts = read_round(rnd)
        stats.record(drafts, accepted)
        if queued is None:
            for c in cache:
                c.trim(rnd.k - accepted)
        done = False
        for i, t in enumerate(tokens):
            emitted += 1
            stats.generated_tokens = emitted
            yield t, i < accepted
            if t in eos_ids or emitted >= max_tokens:
                done = True
                break
        if done:
            return finish()
        if queued is not None:
            pending, queued = queued, None
        else:
            k = next_k()
            pending = build_round(
                pair, rnd.target_tokens[:, accepted : accepted + 1], rnd.hidden[:, accepted : accepted + 1], cache, k
            )
            mx.async_eval(pending.target_tokens, pending.accepted, pending.drafts)
