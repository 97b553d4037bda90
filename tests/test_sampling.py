"""Sampling keeps the target's distribution: chi-square tests with fixed seeds."""

import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler

from mlx_gemma_mtp import load
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.runtime.engine import Engine, Request
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.sampling import Sampling, draw, log_distribution, rejection_verify, uniform


def chi_square_p_value(observed: dict, expected: dict, min_expected: float = 5.0) -> float:
    """Pearson's test; cells expected below `min_expected` are pooled. Wilson-Hilferty p-value."""
    stat, pooled_o, pooled_e, cells = 0.0, 0.0, 0.0, 0
    for token, e in expected.items():
        o = observed.get(token, 0)
        if e < min_expected:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    pooled_o += sum(o for t, o in observed.items() if t not in expected)
    if pooled_e > 0:
        stat, cells = stat + (pooled_o - pooled_e) ** 2 / pooled_e, cells + 1
    elif pooled_o:
        return 0.0  # a token the distribution gives no mass at all
    df = max(cells - 1, 1)
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def log_softmax(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


# --- the rejection step alone, on synthetic distributions ---------------------------------------


def test_rejection_step_preserves_the_target_distribution():
    """Every draw is a row of one call: rows differ by their seeds, so their draws are independent."""
    vocab, k, draws = 8, 2, 6000
    mx.random.seed(3)
    log_p = mx.concatenate([log_softmax(1.5 * mx.random.normal((1, vocab))) for _ in range(k + 1)])
    log_q = mx.concatenate([log_softmax(1.5 * mx.random.normal((1, vocab))) for _ in range(k)])
    seeds, positions = mx.arange(draws).astype(mx.uint32), mx.full((draws,), 5)
    drafts = mx.stack([draw(mx.broadcast_to(log_q[j], (draws, vocab)), uniform(seeds + 10_000, positions + 1 + j, "draft"))
                       for j in range(k)], axis=1)
    accepted, tokens = rejection_verify(
        mx.broadcast_to(log_p[None], (draws, k + 1, vocab)), mx.broadcast_to(log_q[None], (draws, k, vocab)),
        drafts, seeds, positions,
    )
    accepted, tokens = accepted.tolist(), tokens.tolist()
    accepted_counts = Counter(accepted)
    first = Counter(t[0] for t in tokens)
    second_after_accept = Counter(t[1] for t, a in zip(tokens, accepted) if a >= 1)
    p0, p1, q0 = (np.exp(np.array(x)) for x in (log_p[0], log_p[1], log_q[0]))
    n1 = sum(second_after_accept.values())
    assert set(accepted_counts) == {0, 1, 2}  # every branch was taken
    assert chi_square_p_value(first, {t: draws * p0[t] for t in range(vocab)}) > 1e-3
    assert chi_square_p_value(second_after_accept, {t: n1 * p1[t] for t in range(vocab)}) > 1e-3
    # the test has power: the same draws are far from the drafter's own distribution
    assert chi_square_p_value(first, {t: draws * q0[t] for t in range(vocab)}) < 1e-6


# --- end to end on a miniature pair ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(reference_pair, tmp_path_factory):
    target, draft = reference_pair("e2b")  # the centroid-head drafter
    out = tmp_path_factory.mktemp("sampling") / "pair"
    convert(str(target), out, draft=str(draft), dtype="float32", progress=False)
    return load(str(out))[0]


PROMPT = [2, 300, 301, 302, 303, 120, 121]
SETTINGS = {
    "temp-1.0": dict(temperature=1.0),
    "temp-0.7-top-p-0.9": dict(temperature=0.7, top_p=0.9),
    # flat enough that the random drafter's proposals are often accepted: both branches of the
    # rejection step decide tokens here
    "temp-3.0": dict(temperature=3.0),
}


def sample(pair, n_runs, max_tokens, k, seed0=0, **settings):
    """n_runs samples of (token, from_draft) lists, drawn as the rows of one batch (each row has
    its own seed, and its draws depend on nothing else)."""
    eng = Engine(pair, k)
    uids = [eng.insert(PROMPT, Request(max_tokens, Sampling(seed=seed, **settings)))
            for seed in range(seed0, seed0 + n_runs)]
    runs = {u: [] for u in uids}
    while eng.busy:
        for event in eng.step():
            runs[event.uid] += list(zip(event.tokens, event.from_draft))
    return [runs[u] for u in uids]


def target_log_p(pair, contexts, settings):
    """The target's log distribution of the next token after each context (no cache)."""
    logits = pair.target(mx.array(contexts))[:, -1]
    return np.array(log_distribution(Sampling(**settings), logits))


@pytest.fixture(scope="module")
def mixed_runs(pair):
    """1000 samples of every setting in SETTINGS, drawn as interleaved rows of ONE batch: rows
    with different temperatures share every round."""
    eng = Engine(pair, 3)
    draws, uids = 1000, {name: [] for name in SETTINGS}
    for i in range(draws):
        for j, (name, settings) in enumerate(SETTINGS.items()):
            # 5 tokens: room for a round of 3 drafts
            uids[name].append(eng.insert(PROMPT, Request(5, Sampling(seed=j * draws + i, **settings))))
    runs = {}
    while eng.busy:
        for event in eng.step():
            runs.setdefault(event.uid, []).extend(zip(event.tokens, event.from_draft))
    return {name: [runs[u] for u in ids] for name, ids in uids.items()}


@pytest.mark.parametrize("name", SETTINGS)
def test_first_drafted_position_follows_the_target(pair, mixed_runs, name):
    """The token decided by the first MTP round, against the exact marginal sum_t1 p(t1) p(t2 | t1)."""
    settings, draws = SETTINGS[name], 1000
    runs = mixed_runs[name]
    p1 = np.exp(target_log_p(pair, [PROMPT], settings)[0])
    support = [int(t) for t in np.nonzero(p1 > 1e-6)[0]]
    p2 = np.exp(target_log_p(pair, [PROMPT + [t] for t in support], settings))
    marginal = (p1[support][:, None] * p2).sum(axis=0)
    observed = Counter(run[1][0] for run in runs)
    expected = {t: draws * marginal[t] for t in np.nonzero(marginal > 0)[0].tolist()}
    assert chi_square_p_value(observed, expected) > 1e-3
    assert chi_square_p_value(Counter(run[0][0] for run in runs), {t: draws * p1[t] for t in support}) > 1e-3
    if name == "temp-3.0":
        accepted = sum(run[1][1] for run in runs)
        assert 100 < accepted < draws - 100, accepted


def test_plain_and_mtp_marginals_agree_over_continuations(pair):
    settings, draws = dict(temperature=1.0), 1000
    plain = sample(pair, draws, 5, 0, **settings)
    mtp = sample(pair, draws, 5, 3, seed0=50_000, **settings)
    assert sum(d for run in mtp for _, d in run) > 0  # some drafted tokens were accepted
    for position in (2, 3, 4):
        a = Counter(run[position][0] for run in plain)
        b = Counter(run[position][0] for run in mtp)
        # two-sample chi-square: compare each with the pooled frequencies
        pooled = {t: (a[t] + b[t]) / 2 for t in set(a) | set(b)}
        assert chi_square_p_value(a, pooled) > 1e-3 and chi_square_p_value(b, pooled) > 1e-3


def test_custom_sampler_path_follows_the_target(pair):
    """An mlx-lm sampler gives tokens, not a distribution: drafts are accepted when they equal
    the target's samples, which is exact as well."""
    draws = 1000
    runs = sample(pair, draws, 5, 3, sampler=make_sampler(temp=1.0))
    p1 = np.exp(target_log_p(pair, [PROMPT], dict(temperature=1.0))[0])
    assert chi_square_p_value(Counter(r[0][0] for r in runs), {t: draws * p1[t] for t in range(len(p1))}) > 1e-3
    support = [int(t) for t in np.nonzero(p1 > 1e-6)[0]]
    p2 = np.exp(target_log_p(pair, [PROMPT + [t] for t in support], dict(temperature=1.0)))
    marginal = (p1[support][:, None] * p2).sum(axis=0)
    observed = Counter(run[1][0] for run in runs)
    assert chi_square_p_value(observed, {t: draws * m for t, m in enumerate(marginal)}) > 1e-3


@pytest.mark.parametrize("k", [0, 3])
def test_seed_reproduces_a_run(pair, k):
    settings = dict(temperature=0.8, top_k=40)
    a = sample(pair, 3, 20, k, seed0=7, **settings)
    b = sample(pair, 3, 20, k, seed0=7, **settings)
    assert a == b
    assert len({tuple(t for t, _ in run) for run in a}) > 1  # different seeds, different text


def test_greedy_with_repetition_penalty_is_exact(pair):
    def tokens(k, **settings):
        return [t for t, _ in sample(pair, 1, 40, k, **settings)[0]]

    processors = [make_repetition_penalty(1.3, 20)]
    plain = tokens(0, logits_processors=processors)
    for k in (2, 5):
        assert tokens(k, logits_processors=processors) == plain
    assert plain != tokens(0)  # the penalty changes the text


@pytest.mark.parametrize(
    "settings", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2)]
)
def test_bad_sampling_values(settings):
    with pytest.raises(MTPError):
        Sampling(**settings)
