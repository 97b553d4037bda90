"""A loaded pair and what a generation carries: the prompt cache and the statistics.

The round loop itself is in engine.py.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma_mtp.runtime.adaptive import AdaptivePolicies
from mlx_gemma_mtp.runtime.cache import REUSE_ROLLBACK, set_offset
from mlx_gemma_mtp.model.drafter import Drafter
from mlx_gemma_mtp.model.target import TargetView, target_view

# Distinct input shapes (batch size, tokens, full-cache capacity) a compiled step keeps traces for,
# so a long-lived process holds a bounded number of traces: past this the draft step starts afresh,
# and the decode forward drops its least recently used shape.
MAX_TRACES = 32
# A decode forward is compiled for a shape once it has met that shape this many times: a single
# stream meets one shape round after round, while a server's batch passes through many shapes
# (rows join and leave, K changes), each of which would cost a trace (tens of ms) to use only once.
HOT_SHAPE = 4


@dataclass
class Pair:
    target: nn.Module  # mlx-lm Gemma 4 model
    drafter: Optional[Drafter] = None
    # the adaptive draft policy per batch size (engine.py): what it learns carries over between calls
    adaptive: AdaptivePolicies = field(default_factory=AdaptivePolicies, repr=False)
    compile_draft: bool = True  # run the draft step through mx.compile (False: eager)
    compile_verify: bool = True  # run the target's decode forward through mx.compile (False: eager)
    target_config: Optional[dict] = field(default=None, repr=False)  # normalized (config.py)
    draft_config: Optional[dict] = field(default=None, repr=False)
    group: Optional[object] = field(default=None, repr=False)  # mx.distributed group the target is split over (sharding.py)
    images: Optional[object] = field(default=None, repr=False)  # images.ImageEncoder of the target's folder

    def __post_init__(self):
        self.view: TargetView = target_view(self.target)
        self._compiled_step = None
        self._traced_shapes = set()
        self._verify_fns = OrderedDict()  # decode-forward shape -> its compiled forward, least recent first
        self._shape_counts: dict = {}  # decode-forward shape -> forwards run eagerly at it
        # forwards built cold: run eagerly while their shape warms up, or traced for a new shape.
        # A round with one costs more than the same round will from then on (the engine does not
        # time it for the adaptive policy).
        self.cold_forwards = 0

    def draft_step(self):
        """The drafter's step: (token [B, 1], hidden [B, 1, H], K/V, masks, positions [B]) ->
        (greedy token [B, 1], normed h, projected hidden), compiled unless `compile_draft` is off.
        The weights are inputs of the compiled function, so reloaded or trained weights are seen."""
        drafter, view = self.drafter, self.view

        def step(token, hidden, kv, masks, position):
            h, hidden = drafter.step(view.embed(token), hidden, kv, masks, position)
            return drafter.greedy_token(h), h, hidden

        if not self.compile_draft:
            return step
        if self._compiled_step is None or len(self._traced_shapes) > MAX_TRACES:
            self._compiled_step = mx.compile(step, inputs=[drafter.state, view.text.model.embed_tokens.state])
            self._traced_shapes = set()
        compiled, shapes = self._compiled_step, self._traced_shapes

        def traced(token, hidden, kv, masks, position):
            keys = kv["full_attention"][0]  # an array, or a quantized cache's triple
            shape = (token.shape[0], tuple(x.shape for x in (keys if isinstance(keys, tuple) else (keys,))))
            if shape not in shapes:
                shapes.add(shape)
                self.cold_forwards += 1
            return compiled(token, hidden, kv, masks, position)

        return traced

    def verify(self, tokens: mx.array, cache: list) -> tuple:
        """The target's forward over a round's tokens [B, n]: (final-norm hidden [B, n, H],
        logits [B, n, V]), writing each row's n entries at its offset. Compiled unless
        `compile_verify` is off, so that the graph of a decode forward (dozens of small ops per
        layer) is built once per shape instead of every round: the host's share of a round falls,
        and elementwise ops are fused."""
        view = self.view
        states = [(c.keys, c.values) for c in cache]
        shape = (tokens.shape, tuple(a.shape for s in states for a in _leaves(s)))
        fns = self._verify_fns
        if not self.compile_verify or (shape not in fns and self._meet(shape) < HOT_SHAPE):
            self.cold_forwards += self.compile_verify
            hidden = view.hidden(tokens, cache)
            return hidden, view.logits(hidden)

        def forward(tokens, offset, states):
            # traced with the cache of the call that met these shapes first: its host settings
            # (window, capacity, bits) are what the shapes imply
            clones = [copy.copy(c) for c in self._verify_cache]
            for c, (keys, values) in zip(clones, states):
                c.keys, c.values, c.offset = keys, values, offset
            hidden = view.hidden(tokens, clones)
            return hidden, view.logits(hidden), [(c.keys, c.values) for c in clones]

        # One compiled function per shape, the least recently used dropped past MAX_TRACES (its
        # trace goes with it): one shape too many costs one trace, not every shape's again.
        if shape in fns:
            fns.move_to_end(shape)
        else:
            fns[shape] = mx.compile(forward, inputs=[view.text.state])
            self.cold_forwards += 1
            if len(fns) > MAX_TRACES:
                fns.popitem(last=False)
        self._verify_cache = cache
        offset = cache[0].offset
        hidden, logits, states = fns[shape](tokens, offset, states)
        self._verify_cache = None
        for c, (keys, values) in zip(cache, states):
            c.keys, c.values, c.offset = keys, values, offset + tokens.shape[1]
        return hidden, logits

    def _meet(self, shape) -> int:
        """How many decode forwards have met `shape`, this one included (a bounded count)."""
        if len(self._shape_counts) > 64 * MAX_TRACES:
            self._shape_counts.clear()
        self._shape_counts[shape] = self._shape_counts.get(shape, 0) + 1
        return self._shape_counts[shape]


def _leaves(x):
    return [a for part in x for a in (part if isinstance(part, tuple) else (part,))]


@dataclass
class PromptCache:
    """The target's KV cache and the tokens it holds, reusable across calls (multi-turn chat).
    An image's positions hold its content key (images.cache_keys), not the image token."""

    cache: list
    tokens: list = field(default_factory=list)


def make_prompt_cache(pair: Pair) -> PromptCache:
    return PromptCache(pair.view.make_cache())


@dataclass
class Stats:
    prompt_tokens: int = 0  # prompt tokens processed (not counting those the prompt cache held)
    reused_prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    drafted_per_position: list = field(default_factory=list)
    accepted_per_position: list = field(default_factory=list)
    round_log: list = field(default_factory=list)  # (drafted token ids, accepted count) per round
    round_seconds: list = field(default_factory=list)  # wall time of each timed round, host work included
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

    def record(self, drafts: list, accepted: int, seconds: Optional[float]) -> None:
        self.rounds += 1
        if seconds is not None:  # rounds whose time the pipeline could not tell apart are untimed
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


def reuse_prompt_cache(pair: Pair, prompt_cache: PromptCache, prompt: list) -> int:
    """Move the cache back to its longest prefix shared with `prompt` (keeping at least the last
    prompt token to process) and return that length; a cache whose sliding rings cannot move back
    so far is reset."""
    held, common = prompt_cache.tokens, 0
    limit = min(len(held), len(prompt) - 1)
    while common < limit and held[common] == prompt[common]:
        common += 1
    while 0 < common < len(prompt) and prompt[common] < 0 and prompt[common - 1] == prompt[common]:
        common -= 1  # never inside an image (its positions hold its content key): one forward each
    if common == 0 or len(held) - common > REUSE_ROLLBACK:
        prompt_cache.cache, prompt_cache.tokens = pair.view.make_cache(), []
        return 0
    set_offset(prompt_cache.cache, mx.array([common], mx.int32))
    prompt_cache.tokens = held[:common]
    return common


