"""Adaptive draft length: choose K each round to maximize expected tokens per second.

The decode loop asks `choose(max_k)` before every round and reports `observe(k, accepted, seconds)`
after it. The controller keeps

- per draft position i, decayed counts of "reached position i" and "accepted at position i"
  (a conditional acceptance rate, smoothed by a Beta prior whose mean is the previous position's
  estimate, so a position never tried looks like the one before it);
- per K, plain included, the median of its last `cost_window` round times (round costs are not
  linear in K; a K measured only now and then keeps its measurements, and one slow round does not
  move them);
- decayed least-squares sums for the round cost of drafting rounds, t(k) = a + b*k (k >= 1),
  with a weak prior on the slope (the line through the measured t(0), once there is one), for the
  K measured fewer than three times;
- a decayed mean of plain rounds (K = 0) for t(0) until three are timed. A new controller runs
  plain rounds right after its first drafting round until one is timed (at most `plain_tries`):
  how much a drafting round costs is only known against t(0), and where verifying K + 1 tokens
  costs K + 1 times one (a CPU, a large batch) a slope guessed from drafting rounds alone would
  keep it drafting at a loss for many rounds.

It picks argmax_k E[tokens | k] / t(k) over k = 0..max_k with
E[tokens | k] = 1 + sum_{j<=k} prod_{i<=j} p_i. When K = 0 wins, nothing new is learnt about the
drafter, so after `backoff` plain rounds it drafts once more (a probe, K = 1: position 1 gates every
other); the back-off doubles after each probe that does not switch drafting back on, and resets
when one does. While drafting, it measures a neighbour of the chosen K now and then instead (K =
1's lower neighbour is plain decoding), for `explore_rounds` rounds in a row, so a better K next
to the current one is found from its own rounds rather than from the line: in a row, because on
a CPU the engine times a K only from two consecutive rounds of it (runtime/engine.py: there, the interval
between two reads holds parts of two rounds). A neighbour with fewer than three measurements is
measured every `first_explore_every` rounds; a measured one the less often the slower it looks
(every 2 * `explore_every` rounds when as fast as the chosen K, (1 + (gap / `explore_gap`)^2)
times that when `gap` slower, at most `max_explore_every`): a neighbour close to the best may be
the best, one far below it costs each round it runs. Plain decoding as K = 1's neighbour is
measured every `explore_every` rounds per neighbour, however slow it looks. Pure Python and
O(max_k^2) per round: no MLX calls, nothing to synchronize. Its state is bounded: a server runs one
controller per batch size for as long as it serves.

The engine is given its draft lengths as a `DraftPolicies` (end of this module): the policy for
rounds of B rows, by `for_batch(B)`. `EveryBatch(FixedDraft(k))` is a constant K; `AdaptivePolicies`
keeps an `AdaptiveDraft` per B (Pair.adaptive, so what it learns carries over between calls); under
mlx.launch the pair's are agreed across the ranks (sharding.agreed_policies).
"""

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

HISTORY = 256  # the last K chosen that a controller keeps, for reports


@dataclass
class AdaptiveDraft:
    max_k: int = 8
    decay: float = 0.97  # per round: ~30 rounds of memory, so a drafter that stops paying is noticed
    prior_mean: float = 0.5  # acceptance at position 1 before anything is observed
    prior_strength: float = 1.0  # pseudo-rounds behind each position's prior
    slope_prior: float = 0.1  # t(k) ~ t(0) * (1 + slope_prior * k) until two K values are observed
    slope_prior_weight: float = 0.5
    start_k: int = 3
    explore_every: int = 16  # drafting rounds between measurements of a neighbouring K, at least
    first_explore_every: int = 4  # ... while a neighbour has fewer than three measurements
    explore_gap: float = 0.05  # a neighbour this much slower than the chosen K is measured half as often
    max_explore_every: int = 256  # rounds between measurements of one neighbour, at most (costs drift)
    explore_rounds: int = 2  # ... for this many rounds in a row (a CPU's rounds are timed in pairs)
    cost_window: int = 5  # a K's own last rounds that make its cost (plain's too)
    switch_margin: float = 0.03  # a new K must promise this much more throughput to replace the current
    # plain rounds a new controller runs for its first t(0): the engine does not time the warm-up
    # forwards of a shape it has not met (decode.HOT_SHAPE of them: eager, then traced)
    plain_tries: int = 6
    first_backoff: int = 8
    max_backoff: int = 256

    reached: list = field(init=False)  # decayed count of rounds that drafted position i
    accepted: list = field(init=False)  # ... and accepted it
    rounds: int = field(default=0, init=False)  # rounds observed
    chosen: int = field(default=0, init=False)  # rounds chosen: the clock of the exploring schedule
    history: deque = field(init=False)  # the last HISTORY K chosen, for reports

    def __post_init__(self):
        if self.max_k < 1:
            raise ValueError("max_k must be at least 1")
        self.reached = [0.0] * self.max_k
        self.accepted = [0.0] * self.max_k
        self.history = deque(maxlen=HISTORY)
        # cost fit over drafting rounds: decayed sums of w, k, k^2, t, k*t
        self._sw = self._sk = self._skk = self._st = self._skt = 0.0
        self._plain_w = self._plain_t = 0.0
        self._off_rounds = 0  # plain rounds since K = 0 last won or a probe ran
        self._backoff = self.first_backoff
        self._probing = False
        self._k_times = {}  # per K: its last `cost_window` round times
        self._since_explore = 0
        self._explored = 0  # measurements of unmeasured neighbours so far: alternates between the two sides
        self._explored_at = {}  # per K: the round (of `chosen`) it was last measured as a neighbour
        self._exploring = (0, 0)  # (the neighbour being measured, rounds of it still to run)
        self._current = 0  # the K in force: chosen on its merits or probing (not a neighbour's measurement)
        self._plain_tries = 0  # plain rounds chosen to measure t(0) before any was timed

    # --- estimates --------------------------------------------------------------------------

    def acceptance(self) -> list:
        """Estimated conditional acceptance of each position (given the ones before were accepted)."""
        out, mean = [], self.prior_mean
        for n, a in zip(self.reached, self.accepted):
            mean = (a + self.prior_strength * mean) / (n + self.prior_strength)
            out.append(mean)
        return out

    def expected_tokens(self, k: int, acceptance=None) -> float:
        acceptance = self.acceptance() if acceptance is None else acceptance
        total, run = 1.0, 1.0
        for p in acceptance[:k]:
            run *= p
            total += run
        return total

    def cost_line(self):
        """(a, b) of t(k) = a + b*k for drafting rounds, or None before any was observed."""
        if self._sw <= 0:
            return None
        mean_k, mean_t = self._sk / self._sw, self._st / self._sw
        t0 = self._plain_time()
        if t0 is not None:  # the slope's prior: the line through the measured plain rounds
            b0 = max(mean_t - t0, 0.0) / mean_k
        else:  # ... or relative to the line's own level: t(k) ~ a0 * (1 + c*k)
            b0 = self.slope_prior * mean_t / (1 + self.slope_prior * mean_k)
        lam = self.slope_prior_weight * self._sw
        var_k = self._skk - self._sk * mean_k
        cov = self._skt - self._sk * mean_t
        b = (cov + lam * b0) / (var_k + lam)
        return mean_t - b * mean_k, b

    def cost(self, k: int) -> float:
        # a K tried often enough is judged by its own measured rounds: real round costs are not
        # linear in K (matmul blocking, cache effects); the line covers the untried ones
        times = self._k_times.get(k, [])
        if len(times) >= 3:
            return statistics.median(times)
        line, t0 = self.cost_line(), self._plain_time()
        if k == 0:
            return t0 if t0 is not None else line[0] if line else 1.0
        if line is None:  # only plain rounds so far: assume the prior slope
            return (t0 or 1.0) * (1 + self.slope_prior * k)
        a, b = line
        return max(a + b * k, 1e-9)

    def _plain_time(self):
        """t(0): the median of the last plain rounds once three are timed, their decayed mean
        before that; None before any."""
        times = self._k_times.get(0, [])
        if len(times) >= 3:
            return statistics.median(times)
        return self._plain_t / self._plain_w if self._plain_w > 0 else None

    def rates(self, max_k: int) -> list:
        """Expected tokens per second for k = 0..max_k."""
        acceptance = self.acceptance()
        return [self.expected_tokens(k, acceptance) / self.cost(k) for k in range(max_k + 1)]

    def learn_acceptance(self, other) -> None:
        """Start from another controller's acceptance counts (one for another batch size)."""
        self.reached, self.accepted = list(other.reached), list(other.accepted)

    # --- the decode loop's interface --------------------------------------------------------

    def choose(self, max_k: int) -> int:
        """K for the next round (0 = plain), at most max_k."""
        max_k = min(max_k, self.max_k)
        if max_k <= 0:
            return 0
        if self.chosen and self._plain_w == 0 and self._plain_tries < self.plain_tries:
            # from the second round, plain rounds until one is timed: t(0) anchors the costs. More
            # than one: the first rounds of a pipeline are not timed, and on a CPU, where queued
            # rounds overlap, a lone plain round between drafting ones is timed with some of their cost
            self._plain_tries += 1
            return self._pick(0)
        if self._sw == 0 and self._plain_w == 0:
            return self._pick(min(self.start_k, max_k))  # nothing measured yet
        k, left = self._exploring
        if left and k <= max_k:
            self._exploring = (k, left - 1)
            return self._pick(k)
        rates = self.rates(max_k)
        best = max(range(max_k + 1), key=lambda k: rates[k])
        # Round times are noisy: keep the current K unless another is clearly better, so the
        # choice does not wander between near-equal settings.
        current = self._current
        if 0 < current <= max_k and rates[best] < rates[current] * (1 + self.switch_margin):
            best = current
        self._current = best
        if best > 0:
            self._probing, self._backoff, self._off_rounds = False, self.first_backoff, 0
            self._since_explore += 1
            k = self._neighbour_due(best, rates, max_k)
            if k is not None:  # now and then measure a neighbour, so the per-K costs stay current
                self._since_explore, self._explored_at[k] = 0, self.chosen
                self._exploring = (k, self.explore_rounds - 1)
                return self._pick(k)
            return self._pick(best)
        if self._probing:  # the last probe did not switch drafting back on: wait longer
            self._probing = False
            self._backoff = min(2 * self._backoff, self.max_backoff)
        self._off_rounds += 1
        if self._off_rounds > self._backoff:
            # a probe: drafting stays on while it is not clearly worse than plain decoding
            self._off_rounds, self._probing, self._current = 0, True, 1
            return self._pick(1)
        return self._pick(0)

    def _neighbour_due(self, best: int, rates: list, max_k: int):
        """The neighbour of `best` to measure this round, or None. K = 1's lower neighbour is plain
        decoding, measured every `explore_every` rounds per neighbour whatever it looks like: t(0)
        stays measured while drafting wins (a t(0) timed high would otherwise keep drafting on at a
        loss, the more seldom re-measured the higher it was timed)."""
        neighbours = [n for n in (best - 1, best + 1) if 0 <= n <= max_k]
        unmeasured = [n for n in neighbours if len(self._k_times.get(n, [])) < 3]
        if unmeasured:
            if self._since_explore < self.first_explore_every:
                return None
            self._explored += 1
            return unmeasured[self._explored % len(unmeasured)]
        if not neighbours or self._since_explore < self.explore_every:
            return None
        overdue = {}
        for n in neighbours:
            gap = max(0.0, 1 - rates[n] / rates[best])
            every = min(2 * self.explore_every * (1 + (gap / self.explore_gap) ** 2), self.max_explore_every)
            if n == 0:  # plain decoding is not spared for looking slow: that is what may be wrong
                every = len(neighbours) * self.explore_every
            overdue[n] = self.chosen - self._explored_at.get(n, 0) - every
        n = max(overdue, key=overdue.get)
        return n if overdue[n] >= 0 else None

    def _pick(self, k: int) -> int:
        self.chosen += 1
        self.history.append(k)
        return k

    def observe(self, k: int, accepted, seconds: float) -> None:
        """One finished round: K drafted, how many were accepted (a count, or one per row of a
        batch), its wall time.

        Only drafting rounds age the acceptance counts and the drafting cost line, and only plain
        rounds age t(0): a long plain stretch must not wash the evidence back to the prior (the
        back-off schedule, not forgetting, decides when to try the drafter again)."""
        self.rounds += 1
        d = self.decay
        timed = seconds is not None and seconds > 0
        if k == 0:
            if timed:
                self._plain_w = self._plain_w * d + 1
                self._plain_t = self._plain_t * d + seconds
                self._k_times[0] = (self._k_times.get(0, []) + [seconds])[-self.cost_window :]
            return
        self.reached = [n * d for n in self.reached]
        self.accepted = [a * d for a in self.accepted]
        for row in accepted if isinstance(accepted, (list, tuple)) else [accepted]:
            for i in range(min(k, self.max_k)):
                self.reached[i] += 1
                if i >= row:
                    break  # later positions were not reached: they say nothing about acceptance
                self.accepted[i] += 1
        if timed:
            self._sw, self._sk, self._skk = self._sw * d + 1, self._sk * d + k, self._skk * d + k * k
            self._st, self._skt = self._st * d + seconds, self._skt * d + k * seconds
            self._k_times[k] = (self._k_times.get(k, []) + [seconds])[-self.cost_window :]


def controller_for(controllers: dict, batch_size: int, max_k: int = 8) -> AdaptiveDraft:
    """The controller for rounds of `batch_size` rows, kept in `controllers` (one per B: round
    costs differ with B). A new one starts from the nearest B's acceptance counts: acceptance is
    the drafter's and the text's, not B's."""
    if batch_size not in controllers:
        policy = AdaptiveDraft(max_k=max_k)
        if controllers:
            policy.learn_acceptance(controllers[min(controllers, key=lambda b: abs(b - batch_size))])
        controllers[batch_size] = policy
    return controllers[batch_size]


# --- the engine's draft-length policies ----------------------------------------------------------


class DraftPolicy(Protocol):
    """One round's draft length: `choose` before the round is built, `observe` once it is read
    (K drafted, accepted per row, its seconds or None when the engine could not time it)."""

    def choose(self, max_k: int) -> int: ...

    def observe(self, k: int, accepted, seconds: Optional[float]) -> None: ...


class DraftPolicies(Protocol):
    """What the engine is given: the policy for rounds of `batch_size` rows."""

    def for_batch(self, batch_size: int) -> DraftPolicy: ...


@dataclass
class FixedDraft:
    """A constant K."""

    k: int

    def choose(self, max_k: int) -> int:
        return min(self.k, max_k)

    def observe(self, k: int, accepted, seconds: Optional[float]) -> None:
        pass


@dataclass
class EveryBatch:
    """One policy at every batch size: a FixedDraft, or a caller's own policy."""

    policy: DraftPolicy

    def for_batch(self, batch_size: int) -> DraftPolicy:
        return self.policy


class AdaptivePolicies:
    """An AdaptiveDraft per batch size (`controller_for`). `wrap`, if given, wraps each controller
    once, as it is made: what `for_batch` hands out is always the wrapped one (sharding: under
    mlx.launch every rank's controllers learn from rank 0's round times)."""

    def __init__(self, max_k: int = 8, wrap: Optional[Callable] = None):
        self.max_k = max_k
        self._wrap = wrap
        self._controllers: dict = {}  # batch size -> AdaptiveDraft
        self._policies: dict = {}  # batch size -> what the engine drives: the controller, wrapped

    def for_batch(self, batch_size: int) -> DraftPolicy:
        policy = self._policies.get(batch_size)
        if policy is None:
            controller = controller_for(self._controllers, batch_size, self.max_k)
            policy = controller if self._wrap is None else self._wrap(controller)
            self._policies[batch_size] = policy
        return policy

    def controller(self, batch_size: int) -> Optional[AdaptiveDraft]:
        """The controller of rounds of `batch_size` rows, None before any ran (reports, tests)."""
        return self._controllers.get(batch_size)

    def batch_sizes(self) -> list:
        return sorted(self._controllers)

    def clear(self) -> None:
        """Forget everything learnt (benchmarks and tests that need a fresh start)."""
        self._controllers.clear()
        self._policies.clear()
