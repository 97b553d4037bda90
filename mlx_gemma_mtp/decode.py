"""A loaded pair and what a generation carries: the prompt cache and the statistics.

The round loop itself is in engine.py.
"""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import REUSE_ROLLBACK, set_offset
from .drafter import Drafter
from .target import TargetView, target_view

# Distinct input shapes (batch size, full-cache capacity) the compiled draft step keeps traces
# for; past this it starts afresh, so a long-lived process holds a bounded number of traces.
MAX_DRAFT_TRACES = 32


@dataclass
class Pair:
    target: nn.Module  # mlx-lm Gemma 4 model
    drafter: Optional[Drafter] = None
    # the adaptive draft policy per batch size (engine.py): what it learns carries over between calls
    adaptive: dict = field(default_factory=dict, repr=False)
    compile_draft: bool = True  # run the draft step through mx.compile (False: eager)
    target_config: Optional[dict] = field(default=None, repr=False)  # normalized (config.py)
    draft_config: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        self.view: TargetView = target_view(self.target)
        self._compiled_step = None
        self._traced_shapes = set()

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
        if self._compiled_step is None or len(self._traced_shapes) > MAX_DRAFT_TRACES:
            self._compiled_step = mx.compile(step, inputs=[drafter.state, view.text.model.embed_tokens.state])
            self._traced_shapes = set()
        compiled, shapes = self._compiled_step, self._traced_shapes

        def traced(token, hidden, kv, masks, position):
            shapes.add((token.shape[0], kv["full_attention"][0].shape[2]))
            return compiled(token, hidden, kv, masks, position)

        return traced


@dataclass
class PromptCache:
    """The target's KV cache and the tokens it holds, reusable across calls (multi-turn chat)."""

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


def reuse_prompt_cache(pair: Pair, prompt_cache: PromptCache, prompt: list) -> int:
    """Move the cache back to its longest prefix shared with `prompt` (keeping at least the last
    prompt token to process) and return that length; a cache whose sliding rings cannot move back
    so far is reset."""
    held, common = prompt_cache.tokens, 0
    limit = min(len(held), len(prompt) - 1)
    while common < limit and held[common] == prompt[common]:
        common += 1
    if common == 0 or len(held) - common > REUSE_ROLLBACK:
        prompt_cache.cache, prompt_cache.tokens = pair.view.make_cache(), []
        return 0
    set_offset(prompt_cache.cache, mx.array([common], mx.int32))
    prompt_cache.tokens = held[:common]
    return common


