"""The batched engine against the single-stream path: rows of one batch decode exactly what each
prompt decodes alone, whatever the other rows do, with rounds pipelined."""

import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma_mtp.runtime.engine as engine
import reference_models as ref
from mlx_gemma_mtp import batch_generate
from mlx_gemma_mtp.bench.run import InjectedAcceptance
from mlx_gemma_mtp.runtime.cache import cache_bytes
from mlx_gemma_mtp.runtime.pair import HOT_SHAPE, Pair
from mlx_gemma_mtp.runtime.engine import Engine, Request, generate_tokens
from mlx_gemma_mtp.runtime.sampling import Sampling

# (batch size, K) per variant: every variant meets both batch sizes and every K over the grid
SETTINGS = [(2, 1), (4, 3), (2, 6), (4, "adaptive")]


def prompts_for(window: int, count: int, seed: int = 0) -> list:
    """Prompts of different lengths: one shorter than the window, one longer than twice it."""
    rng = np.random.default_rng(seed)
    lengths = [window // 2, 2 * window + 7, window + 3, 3 * window + 1][:count]
    return [[2] + rng.integers(110, 512, size=n).tolist() for n in lengths]


def plain(pair, prompt, n, eos=()):
    return [t for t, _ in generate_tokens(Pair(pair.target), prompt, n, 0, eos)]


def run_rows(pair, prompts, max_tokens, k, filters=None, eos=()):
    """Every prompt as a row of one batch; returns (tokens per row, accepted counts per row)."""
    eng = Engine(pair, k)
    uids = []
    for i, p in enumerate(prompts):
        limit = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        request = Request(limit, Sampling(), frozenset(eos), None, filters[i] if filters else None)
        uids.append(eng.insert(p, request))
    stats = {u: eng.rows[u].stats for u in uids}
    out = {u: [] for u in uids}
    while eng.busy:
        for event in eng.step():
            out[event.uid] += event.tokens
    return [out[u] for u in uids], [[a for _, a in stats[u].round_log] for u in uids]


@pytest.mark.parametrize("batch,k", SETTINGS, ids=[f"B{b}-K{k}" for b, k in SETTINGS])
@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_rows_equal_single_stream_plain(variant, batch, k, loaded):
    pair, _ = loaded(variant)
    window = pair.view.args.sliding_window
    fixed = k if k != "adaptive" else 0
    n = 4 * window + 5 + 25 * fixed  # enough rounds for every accepted count to occur
    prompts = prompts_for(window, batch, seed=batch)
    expected = [plain(pair, p, n + 16) for p in prompts]
    vocab = pair.view.args.vocab_size
    # conditional acceptance (K - j) / (K - j + 1) at draft j makes every count 0..K equally likely
    profile = [(fixed - j) / (fixed - j + 1) for j in range(fixed)] or [0.75]
    filters = [InjectedAcceptance(e, len(p), profile, vocab, seed=i) for i, (p, e) in enumerate(zip(prompts, expected))]
    rows, accepted = run_rows(pair, prompts, n, k, filters)
    for row, e in zip(rows, expected):
        assert row == e[:n]
    if k != "adaptive":
        for counts in accepted:  # ragged acceptance: every count 0..K in every row
            assert set(counts) == set(range(k + 1)), counts


def test_rows_stop_exactly(loaded):
    pair, _ = loaded("e2b")
    window = pair.view.args.sliding_window
    prompts = prompts_for(window, 3, seed=7)
    expected = [plain(pair, p, 60) for p in prompts]
    vocab = pair.view.args.vocab_size
    filters = [InjectedAcceptance(e, len(p), [1.0], vocab) for p, e in zip(prompts, expected)]
    # row 0 stops at an EOS id inside an accepted block; rows 1 and 2 at their own max_tokens
    eos = expected[0][13]
    limits = [60, 17, 41]
    rows, _ = run_rows(pair, prompts, limits, 4, filters, eos=[eos])
    for row, e, limit in zip(rows, expected, limits):
        stop = next((i + 1 for i, t in enumerate(e[:limit]) if t == eos), limit)
        assert row == e[:stop]
    assert len(rows[0]) <= 14


def test_rows_joining_and_leaving_do_not_change_other_rows(loaded):
    pair, _ = loaded("26b")
    window = pair.view.args.sliding_window
    prompts = prompts_for(window, 4, seed=11)
    expected = [plain(pair, p, 70) for p in prompts]
    vocab = pair.view.args.vocab_size
    filters = [InjectedAcceptance(e, len(p), [0.7], vocab, seed=i) for i, (p, e) in enumerate(zip(prompts, expected))]
    eng = Engine(pair, 3, prefill_step=16)  # long prompts take several steps to join
    out = {}

    def insert(i):
        uid = eng.insert(prompts[i], Request(70, Sampling(), frozenset(), None, filters[i]))
        out[uid] = (i, [])
        return uid

    def steps(n):
        for _ in range(n):
            for event in eng.step():
                out[event.uid][1].extend(event.tokens)

    first, second = insert(0), insert(1)
    steps(6)
    third = insert(2)
    steps(4)
    eng.remove(second)  # cancelled midway
    insert(3)
    while eng.busy:
        steps(1)
    for uid, (i, tokens) in out.items():
        if uid == second:
            assert tokens == expected[i][: len(tokens)] and len(tokens) < 70
        else:
            assert tokens == expected[i][:70], i
    assert first != third


@pytest.mark.parametrize("k", [0, 3])
def test_rounds_are_pipelined_with_one_sync_each(k, loaded, monkeypatch):
    pair, _ = loaded("e4b")
    window = pair.view.args.sliding_window
    prompts = prompts_for(window, 2, seed=5)
    expected = [plain(pair, p, 40) for p in prompts]
    vocab = pair.view.args.vocab_size
    filters = [InjectedAcceptance(e, len(p), [0.7], vocab, seed=i) for i, (p, e) in enumerate(zip(prompts, expected))]
    evals = []
    real_eval = mx.eval
    monkeypatch.setattr(engine.mx, "eval", lambda *a: (evals.append(1), real_eval(*a))[1])
    eng = Engine(pair if k else Pair(pair.target), k)
    eng.trace = []
    for p, f in zip(prompts, filters):
        eng.insert(p, Request(40, Sampling(), frozenset(), None, f))
    while eng.waiting:
        eng.step()
    evals.clear()
    joined_at = len(eng.trace)
    rows = {u: [] for u in eng.rows}
    while eng.busy:
        for event in eng.step():
            rows[event.uid] += event.tokens
    trace = [t[:2] for t in eng.trace[joined_at:]]
    reads = [n for what, n in trace if what == "read"]
    assert len(reads) > 8
    # round n + 1 was submitted before round n was read, for every round read in steady state
    for n in reads[1:-1]:
        assert ("submit", n + 1) in trace[: trace.index(("read", n))], (n, trace)
    assert len(evals) == len(reads)  # one host synchronization per round read



class Alternating:
    """A draft-length policy cycling through `ks`; records what each round is timed at."""

    def __init__(self, ks):
        self.ks, self.chosen, self.observed = ks, 0, []

    def choose(self, max_k):
        self.chosen += 1
        return min(self.ks[(self.chosen - 1) % len(self.ks)], max_k)

    def observe(self, k, accepted, seconds):
        self.observed.append((k, seconds))


@pytest.mark.parametrize("slow_queue", [True, False], ids=["queue-waits", "queue-returns"])
def test_a_round_is_timed_only_when_its_interval_is_its_own(slow_queue, loaded, monkeypatch):
    """When queuing the next round waits (MLX's CPU), a read interval holds parts of two rounds:
    rounds are timed only where the next one drafted the same K. When queuing returns at once (a
    GPU), every steady round is timed by its own interval."""
    pair, _ = loaded("e4b")
    real_async_eval = mx.async_eval
    if slow_queue:  # queuing waits far longer than the fixture's rounds compute
        monkeypatch.setattr(engine.mx, "async_eval", lambda *a: (time.sleep(0.05), real_async_eval(*a))[1])
    else:  # queuing costs nothing: the read waits for the computation
        monkeypatch.setattr(engine.mx, "async_eval", lambda *a: None)
    prompt = prompts_for(pair.view.args.sliding_window, 1, seed=3)[0]
    for ks in ([2], [0, 2], [2, 2, 0]):
        warm_up = [t for t, _ in generate_tokens(pair, prompt, 40, Alternating(ks))]  # shapes met: no warm-up forwards
        policy = Alternating(ks)
        tokens = [t for t, _ in generate_tokens(pair, prompt, 40, policy)]
        assert tokens == warm_up
        assert tokens == plain(pair, prompt, 40)
        steady = policy.observed[2:-2]
        assert len(steady) >= 6
        for n, (k, seconds) in enumerate(steady, start=2):
            following = ks[(n + 1) % len(ks)]  # round n + 1's K (rounds are numbered from 0 here)
            if slow_queue and following != k:
                assert seconds is None, (ks, n, policy.observed)
            else:
                assert seconds is not None and seconds > 0, (ks, n, policy.observed)

def test_warm_up_forwards_are_not_timed(loaded, monkeypatch):
    """A forward run eagerly while its shape warms up, or traced, costs more than the same round
    will from then on: the round is not timed, nor its neighbours (the one before it builds it,
    perhaps tracing; on MLX's CPU the one after it can hold its end). On a fresh pair the first rounds are warm-ups; on the next run every steady round is
    timed (queuing returns at once here, as on a GPU, so no interval is shared). The last round
    drafts fewer tokens (max_tokens), a shape of its own: it and the round before it are cold."""
    loaded_pair, _ = loaded("e4b")
    pair = Pair(loaded_pair.target, loaded_pair.drafter)  # no shape met yet
    monkeypatch.setattr(engine.mx, "async_eval", lambda *a: None)
    prompt = prompts_for(pair.view.args.sliding_window, 1, seed=5)[0]
    first, second = Alternating([2]), Alternating([2])
    assert [t for t, _ in generate_tokens(pair, prompt, 24, first)] == plain(pair, prompt, 24)
    # the verify shape's HOT_SHAPE - 1 eager forwards, its trace, and the round after them
    assert [s for _, s in first.observed[: HOT_SHAPE + 1]] == [None] * (HOT_SHAPE + 1), first.observed
    assert all(s is not None for _, s in first.observed[HOT_SHAPE + 1 : -2]), first.observed
    assert [t for t, _ in generate_tokens(pair, prompt, 24, second)] == plain(pair, prompt, 24)
    assert all(s is not None for _, s in second.observed[1:-2]), second.observed


def test_batch_generate_matches_generate_per_row(loaded):
    pair, tokenizer = loaded("31b")
    window = pair.view.args.sliding_window
    prompts = prompts_for(window, 3, seed=3)
    result = batch_generate(pair, tokenizer, prompts, max_tokens=[30, 12, 25], num_draft_tokens=2, max_batch=2)
    eos = tokenizer.eos_token_ids
    for p, tokens, limit, reason in zip(prompts, result.tokens, [30, 12, 25], result.finish_reasons):
        assert tokens == plain(pair, p, limit, eos)
        assert reason == ("stop" if tokens[-1] in eos else "length")
    assert [s.generated_tokens for s in result.stats] == [len(t) for t in result.tokens]
    assert result.total["generated_tokens"] == sum(len(t) for t in result.tokens) > 0
    assert result.texts[1] == tokenizer.decode(result.tokens[1])


def test_row_cache_memory_equals_single_stream(loaded):
    pair, _ = loaded("e2b")
    window = pair.view.args.sliding_window
    prompts = prompts_for(window, 4, seed=9)
    single = []
    for p in prompts:
        eng = Engine(pair, 0)
        eng.insert(p, Request(50, Sampling()))
        eng.step()
        single.append(cache_bytes(eng.batch.cache))
    eng = Engine(pair, 0)
    for p in prompts:
        eng.insert(p, Request(50, Sampling()))
    while eng.waiting:
        eng.step()
    batched = cache_bytes(eng.batch.cache)
    # every row is padded to the longest row's full-layer buffer, which grows in 256-entry steps
    assert abs(batched - len(prompts) * max(single)) <= 0.05 * batched


def resident_bytes() -> int:
    from mlx_gemma_mtp.server.worker import resident_bytes as now

    return now()


def test_memory_stays_flat_over_many_mtp_calls(loaded):
    """Each call re-uses the compiled draft step's traces (its shapes change only with the batch
    size and the full buffers' 256-entry steps), so repeated calls do not grow the process."""
    pair, _ = loaded("e4b")
    prompt = prompts_for(pair.view.args.sliding_window, 1, seed=1)[0]

    def call():
        list(generate_tokens(pair, prompt, 260, 3))  # past the first 256-entry buffer step

    from mlx_gemma_mtp.runtime.pair import HOT_SHAPE

    for _ in range(HOT_SHAPE + 1):  # every shape a call meets is met often enough to be compiled
        call()
    rss, active, traces = resident_bytes(), mx.get_active_memory(), len(pair._traced_shapes)
    for _ in range(3):
        call()
    assert len(pair._traced_shapes) == traces
    assert mx.get_active_memory() <= active + 1_000_000
    assert resident_bytes() - rss < 2_000_000, resident_bytes() - rss


def test_a_failing_row_ends_alone(loaded):
    """A row whose own logits processor raises ends with finish_reason "error"; the others go on."""
    pair, _ = loaded("e2b")
    prompts = prompts_for(pair.view.args.sliding_window, 2, seed=4)
    calls = []

    def broken(history, logits):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return logits

    eng = Engine(pair, 2)
    good = eng.insert(prompts[0], Request(30, Sampling()))
    bad = eng.insert(prompts[1], Request(30, Sampling(logits_processors=[broken])))
    out, errors = {good: [], bad: []}, []
    while eng.busy:
        for event in eng.step():
            out[event.uid] += event.tokens
            if event.finish_reason == "error":
                errors.append((event.uid, event.error))
    assert errors == [(bad, "RuntimeError: boom")]
    assert out[good] == plain(pair, prompts[0], 30)


def test_compiled_verify_equals_eager_across_shape_changes(loaded, monkeypatch):
    """The compiled target forward gives the eager forward's tokens while batch sizes, draft
    lengths and cache capacities change, and keeps at most MAX_TRACES traces (the least recently
    used shape's is dropped)."""
    import mlx_gemma_mtp.runtime.pair as decode

    monkeypatch.setattr(decode, "MAX_TRACES", 3)
    compiled_forwards = []
    compile_ = decode.mx.compile
    monkeypatch.setattr(decode.mx, "compile", lambda fn, **kw: compiled_forwards.append(fn.__name__) or compile_(fn, **kw))
    loaded_pair, _ = loaded("e2b")
    prompts = prompts_for(loaded_pair.view.args.sliding_window, 3, seed=5)
    outputs = {}
    for compiled in (True, False):
        pair = Pair(loaded_pair.target, loaded_pair.drafter, compile_verify=compiled)
        runs = []
        for k, rows in ((1, 3), (3, 2), ("adaptive", 1)):
            runs.append(run_rows(pair, prompts[:rows], 240, k)[0])  # the full buffers grow past 256
        outputs[compiled] = runs
        if compiled:
            assert len(pair._verify_fns) == 3 and compiled_forwards.count("forward") > 3, compiled_forwards
    assert outputs[True] == outputs[False]


def test_adaptive_policy_of_a_new_batch_size_starts_from_the_nearest(loaded):
    """Acceptance does not depend on B: a batch size met for the first time starts from the
    acceptance counts of the nearest one that has run (its costs it measures itself)."""
    pair, _ = loaded("e2b")
    pair.adaptive.clear()
    prompts = prompts_for(pair.view.args.sliding_window, 3, seed=11)
    eng = Engine(pair, "adaptive")
    assert eng.policies is pair.adaptive  # kept on the pair: what it learns carries over between calls
    eng.insert(prompts[0], Request(24))
    while eng.busy:
        eng.step()
    one = pair.adaptive.controller(1)
    assert sum(one.reached) > 0
    two = eng.policies.for_batch(2)
    assert two is pair.adaptive.controller(2)
    assert two.acceptance() == one.acceptance() and not two.history
    pair.adaptive.clear()
