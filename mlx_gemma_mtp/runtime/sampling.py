"""Sampling that keeps the target's distribution, for B rows at once.

A row decides its tokens in one of three ways (a strategy each), on device inside the round:
- Greedy (temperature 0): the target's argmax; drafts are accepted while they equal it.
- CustomSampler (an mlx-lm `sampler=`, which gives tokens, not a distribution): the target samples
  every verified position and drafts are accepted while they equal its samples, which is exact too.
- Rejection (temperature > 0): speculative rejection sampling. A draft d drawn from the drafter's
  q is kept with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
  the normalized residual max(0, p - q); after K acceptances the bonus token comes from p.
p is the target's distribution after logits processors and truncation, exactly as mlx-lm's
`make_sampler` forms it (top-p, min-p, top-k on the log-probabilities, then temperature).

Every random draw is one uniform number from a hash of (the row's seed, the position it decides,
its purpose), computed on the device: a row's draws depend on nothing else (not the batch, not
how rounds fell), so a seeded row repeats, and no draw that decided an emitted token is reused.
A token is drawn by inverting the cumulative distribution at that number.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.limits import MAX_SEED

PURPOSES = {"draft": 0x68E31DA4, "accept": 0xB5297A4D, "residual": 0x1B56C4E9, "bonus": 0x7FEB352D}


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
        number = (int, float)
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, number):
                raise MTPError(f"{name} must be a number, got {value!r}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise MTPError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MTPError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise MTPError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise MTPError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.sampler is not None and not callable(self.sampler):
            raise MTPError(f"sampler must be callable, got {self.sampler!r}")
        if not isinstance(self.logits_processors, (list, tuple)) or not all(
            callable(p) for p in self.logits_processors
        ):
            raise MTPError("logits_processors must be a list of callables")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise MTPError(f"seed must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")
        if self.seed is None and not self.greedy:
            # from MLX's global generator, so mx.random.seed() still governs unseeded runs
            self.seed = mx.random.randint(0, 2**31 - 1).item()

    @property
    def greedy(self) -> bool:
        return self.sampler is None and self.temperature == 0

    @property
    def rejection(self) -> bool:
        return self.sampler is None and self.temperature > 0


# --- keyed draws ---------------------------------------------------------------------------------


def _mix(x: mx.array) -> mx.array:
    """A 32-bit integer hash (xor-shift-multiply), on uint32 arrays."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, mx.uint32)
    return x ^ (x >> 16)


def uniform(seed: mx.array, position: mx.array, purpose: str) -> mx.array:
    """Uniform numbers in [0, 1), one per element of `position` (seed broadcasts against it)."""
    x = _mix(seed.astype(mx.uint32) ^ mx.array(PURPOSES[purpose], mx.uint32))
    x = _mix(x + position.astype(mx.uint32))
    x = _mix(x ^ (seed.astype(mx.uint32) * mx.array(0x9E3779B9, mx.uint32)))
    return (x >> 8).astype(mx.float32) * (1.0 / (1 << 24))


def draw(log_p: mx.array, u: mx.array) -> mx.array:
    """The token where the cumulative distribution of log_p [..., V] first exceeds u [...]."""
    cdf = mx.cumsum(mx.exp(log_p.astype(mx.float32)), axis=-1)
    target = u[..., None] * cdf[..., -1:]
    return mx.argmax(cdf > target, axis=-1).astype(mx.int32)


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


def process(sampling: Sampling, logits: mx.array, history: Optional[mx.array]) -> mx.array:
    """mlx-lm logits processors, given every token before the predicted one."""
    for processor in sampling.logits_processors:
        logits = processor(history, logits)
    return logits


def accepted_count(matches: mx.array) -> mx.array:
    """[B]: the leading run of True in matches [B, k]."""
    if matches.shape[1] == 0:
        return mx.zeros((matches.shape[0],), mx.int32)
    return mx.cumprod(matches.astype(mx.int32), axis=1).sum(axis=1)


# --- strategies ----------------------------------------------------------------------------------
# Each takes the rows of a group (rows sharing the same settings):
#   first(logits [b, V], seeds [b], positions [b]) -> tokens [b]   (the token after the prompt)
#   draft(h [b, 1, H], greedy [b, 1], drafter, seeds, positions, j) -> (tokens [b, 1], log q [b, V] or None)
#       for draft j (0-based) of the block
#   verify(logits [b, k+1, V], drafts [b, k], log_q [b, k, V] or None, seeds, positions)
#       -> (accepted [b], tokens [b, k+1]); the first accepted + 1 tokens are emitted.
# `positions` are those of the row's last token (the first draft decides positions + 1).


class Greedy:
    samples_drafts = False  # drafts are the drafter's argmax

    def __init__(self, sampling: Sampling):
        pass

    def first(self, logits, seeds, positions):
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    def draft(self, h, greedy, drafter, seeds, positions, j: int = 0):
        return greedy, None

    def verify(self, logits, drafts, log_q, seeds, positions):
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
        return accepted_count(drafts == tokens[:, :-1]), tokens


class CustomSampler(Greedy):
    def __init__(self, sampling: Sampling):
        self.sampler = sampling.sampler

    def _sample(self, logits):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs).astype(mx.int32)

    def first(self, logits, seeds, positions):
        return self._sample(logits).reshape(-1)

    def verify(self, logits, drafts, log_q, seeds, positions):
        tokens = self._sample(logits).reshape(drafts.shape[0], -1)
        return accepted_count(drafts == tokens[:, :-1]), tokens


class Rejection:
    samples_drafts = True  # drafts are drawn from the drafter's q, which verification needs

    def __init__(self, sampling: Sampling):
        self.sampling = sampling

    def first(self, logits, seeds, positions):
        return draw(log_distribution(self.sampling, logits), uniform(seeds, positions, "bonus"))

    def draft(self, h, greedy, drafter, seeds, positions, j: int = 0):
        log_q = log_distribution(self.sampling, drafter.logits(h, per_row=True)[:, 0])  # [b, V]
        return draw(log_q, uniform(seeds, positions + 1 + j, "draft"))[:, None], log_q

    def verify(self, logits, drafts, log_q, seeds, positions):
        log_p = log_distribution(self.sampling, logits)  # [b, k+1, V]
        return rejection_verify(log_p, log_q, drafts, seeds, positions)


def rejection_verify(log_p, log_q, drafts, seeds, positions):
    """Accepted counts [b] and tokens [b, k+1] by speculative rejection sampling.

    log_p [b, k+1, V] (the target's, after truncation and temperature), log_q [b, k, V] (the
    drafter's), drafts [b, k]; seeds and positions [b] (positions of the token before draft 1).
    """
    b, k = drafts.shape
    at = positions[:, None] + 1 + mx.arange(k + 1)[None]  # [b, k+1]: the position each token decides
    if k:
        d = drafts[..., None]
        ratio = mx.exp(mx.take_along_axis(log_p[:, :k], d, -1) - mx.take_along_axis(log_q, d, -1))[..., 0]
        keep = uniform(seeds[:, None], at[:, :k], "accept") < ratio
        p, q = mx.exp(log_p[:, :k]), mx.exp(log_q)
        residual = mx.maximum(p - q, 0)
        # p == q leaves no residual, but then the draft is always accepted: any fallback works
        residual = mx.where(residual.sum(-1, keepdims=True) > 0, residual, p)
        replaced = draw(mx.log(residual), uniform(seeds[:, None], at[:, :k], "residual"))
    else:
        keep, replaced = mx.zeros((b, 0), mx.bool_), mx.zeros((b, 0), mx.int32)
    bonus = draw(log_p[:, k], uniform(seeds, at[:, k], "bonus"))
    accepted = accepted_count(keep)
    chosen = mx.take_along_axis(mx.concatenate([replaced, bonus[:, None]], axis=1), accepted[:, None], axis=1)
    is_draft = mx.arange(k + 1)[None] < accepted[:, None]
    padded = mx.concatenate([drafts, mx.zeros((b, 1), mx.int32)], axis=1)
    return accepted, mx.where(is_draft, padded, chosen)


def strategy_of(sampling: Sampling):
    if sampling.greedy:
        return Greedy(sampling)
    return CustomSampler(sampling) if sampling.sampler is not None else Rejection(sampling)


def group_key(sampling: Sampling) -> tuple:
    """Rows with equal keys run through one strategy call (seeds are per row)."""
    if sampling.greedy:
        return ("greedy",)
    if sampling.sampler is not None:
        return ("sampler", id(sampling.sampler))
    return ("rejection", sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p,
            sampling.min_tokens_to_keep)
