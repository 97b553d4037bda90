"""Sampling that keeps the target's distribution.

Three ways a round decides its tokens, all on device inside the round's graph:
- greedy (temperature 0): the target's argmax; drafts are accepted while they equal it.
- a custom mlx-lm `sampler=` (it gives tokens, not a distribution): the target samples every
  verified position and drafts are accepted while they equal its samples, which is exact too.
- temperature > 0: speculative rejection sampling. A draft d drawn from the drafter's q is kept
  with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from the
  normalized residual max(0, p - q); after K acceptances the bonus token comes from p.
p is the target's distribution after logits processors and truncation, exactly as mlx-lm's
`make_sampler` forms it (top-p, min-p, top-k on the log-probabilities, then temperature).
Random draws use keys derived from (seed, position, purpose), so a run is reproducible whatever
the rounds look like, and no draw that decided an emitted token is ever reused.
"""

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .errors import MTPError


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    sampler: Optional[Callable] = None  # an mlx-lm sampler: log-probs -> tokens
    logits_processors: list = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise MTPError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MTPError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise MTPError(f"top_k must be a whole number >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise MTPError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is None and not self.greedy:
            # from MLX's global generator, so mx.random.seed() still governs unseeded runs
            self.seed = mx.random.randint(0, 2**31 - 1).item()

    @property
    def greedy(self) -> bool:
        return self.sampler is None and self.temperature == 0


def key(seed: int, position: int, purpose: str) -> mx.array:
    """A PRNG key for one draw: which sequence position it decides, and what for."""
    return mx.random.key((seed * 1_000_003 + position * 31 + zlib.crc32(purpose.encode())) % 2**63)


def process(sampling: Sampling, logits: mx.array, history: Optional[mx.array]) -> mx.array:
    """mlx-lm logits processors, given every token before the predicted one."""
    for processor in sampling.logits_processors:
        logits = processor(history, logits)
    return logits


def log_distribution(sampling: Sampling, logits: mx.array) -> mx.array:
    """log p in float32 over the last axis: truncation as mlx-lm's make_sampler, then temperature."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if 0 < sampling.top_p < 1:
        logprobs = apply_top_p(logprobs, sampling.top_p)
    if sampling.min_p:
        logprobs = apply_min_p(logprobs, sampling.min_p, sampling.min_tokens_to_keep)
    if sampling.top_k and sampling.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, sampling.top_k)
    scaled = logprobs / sampling.temperature
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def draw(log_p: mx.array, seed: int, position: int, purpose: str) -> mx.array:
    return mx.random.categorical(log_p, key=key(seed, position, purpose)).astype(mx.int32)


def rejection_round(
    sampling: Sampling, drafts: mx.array, log_q: list, log_p: list, position: int
) -> tuple[mx.array, mx.array]:
    """Accepted count [1] and tokens [1, k + 1] (the first accepted + 1 are emitted).

    drafts [1, k]; log_q[i], log_p[i] are [1, V] for the token at position + 1 + i (log_p has k + 1).
    """
    k, seed = drafts.shape[1], sampling.seed
    choices, accepts = [], []
    for i in range(k):
        d = drafts[:, i : i + 1]
        ratio = mx.exp(mx.take_along_axis(log_p[i], d, -1) - mx.take_along_axis(log_q[i], d, -1))
        u = mx.random.uniform(shape=(1, 1), key=key(seed, position + 1 + i, "accept"))
        accepts.append((u < ratio)[:, 0])
        residual = mx.maximum(mx.exp(log_p[i]) - mx.exp(log_q[i]), 0)
        # p == q leaves no residual, but then the draft is always accepted: any fallback works
        residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, mx.exp(log_p[i]))
        choices.append(draw(mx.log(residual), seed, position + 1 + i, "residual"))
    choices.append(draw(log_p[k], seed, position + 1 + k, "bonus"))
    accepted = mx.cumprod(mx.stack(accepts, axis=1).astype(mx.int32), axis=1).sum(axis=1) if k else mx.zeros((1,), mx.int32)
    chosen = mx.take_along_axis(mx.stack(choices, axis=1), accepted[:, None], axis=1)
    is_draft = mx.arange(k + 1)[None] < accepted[:, None]
    padded = mx.concatenate([drafts, mx.zeros((1, 1), mx.int32)], axis=1)
    return accepted, mx.where(is_draft, padded, chosen)
