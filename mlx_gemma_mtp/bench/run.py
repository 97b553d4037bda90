"""`gemma-mtp bench`: mlx-lm, our plain path and our MTP path side by side, in one process.

Every setting decodes the same prompts on the same pair, interleaved over the repeats, and is
timed the same way (decode rate from the first generated token to the last; time to first token
from the call). The cost split of a round comes from timing draft-only and verify-only graphs of
the same shapes on a warm cache; host overhead is what the measured round time leaves over.
See shared/design/measuring.md for why everything is a ratio on machines without Apple Silicon.

The random `--shape` pairs are built in shapes.py, the report is printed, written and drawn in
bench_report.py, and the OpenBLAS re-exec lives in blas.py.
"""

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.runtime.pair import Pair, Stats
from mlx_gemma_mtp.runtime.adaptive import AdaptiveDraft, AdaptivePolicies, EveryBatch
from mlx_gemma_mtp.bench.blas import openblas_loaded
from mlx_gemma_mtp.runtime.cache import concat_rows, reserve, set_offset
from mlx_gemma_mtp.runtime.pair import HOT_SHAPE
from mlx_gemma_mtp.runtime.engine import Batch, draft_block, generate_tokens  # the loop's internals, here only
from mlx_gemma_mtp.runtime.sampling import Greedy, Sampling


# --- injected acceptance ---------------------------------------------------------------------


@dataclass
class InjectedAcceptance:
    """A `draft_filter` that makes draft j right with conditional probability profile[j].

    Draft j of a round is replaced by the target's greedy token at its position (from a plain run
    done beforehand) when a seeded draw says so, and otherwise by a token guaranteed to differ.
    Draws are keyed by (seed, the draft's own position, j) and tabled beforehand, so the filter
    runs on the device with the row's position as an array (no host sync), every setting meets
    the same draw at the same place (common random numbers: settings differ by their costs and
    K, not by luck), and draws stay independent. The drafter's own tokens stay in the graph
    (`where` reads them), so it runs at full cost. A profile shorter than K repeats its last value."""

    continuation: list  # the target's greedy output, starting at absolute position prompt_len
    prompt_len: int
    profile: list
    vocab: int
    seed: int = 0
    max_k: int = 16

    def __post_init__(self):
        end = self.prompt_len + len(self.continuation) + self.max_k + 1
        right = [0] * self.prompt_len + self.continuation
        right += [self.continuation[-1]] * (end - len(right))
        self._right = mx.array(right, mx.int32)
        rng = np.random.default_rng(self.seed)
        profile = [self.profile[min(j, len(self.profile) - 1)] for j in range(self.max_k)]
        self._keep = mx.array(rng.random((end, self.max_k)) < np.array(profile))

    def __call__(self, drafts: mx.array, position: mx.array) -> mx.array:
        k = drafts.shape[1]
        at = position[:, None] + 1 + mx.arange(k)[None]  # [1, k]: the positions the drafts take
        right = mx.take(self._right, at)
        keep = mx.take_along_axis(mx.take(self._keep, at[0], axis=0)[None], mx.arange(k)[None, :, None], axis=2)[..., 0]
        wrong = (right + 1) % self.vocab
        own = mx.where(drafts == right, wrong, drafts)
        return mx.where(keep, right, own)


def parse_profile(text: str) -> list:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ValueError(f"acceptance profile must be comma-separated probabilities in [0, 1], got {text!r}")
    return values


def conditional_acceptance(round_log: list, max_k: int) -> list:
    """Per position: accepted / reached, where reached means every earlier draft was accepted."""
    reached, accepted = [0] * max_k, [0] * max_k
    for drafts, n in round_log:
        for j in range(min(len(drafts), max_k)):
            reached[j] += 1
            if j >= n:
                break
            accepted[j] += 1
    return [a / r if r else None for a, r in zip(accepted, reached)]


# --- timed runs ------------------------------------------------------------------------------


@dataclass
class Run:
    tokens: list
    ttft: float  # seconds from the call to the first token
    decode_seconds: float  # first token to last
    peak_memory_bytes: int
    stats: Optional[Stats] = None

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def timed(stream) -> tuple:
    start = time.perf_counter()
    tokens, first = [], None
    for t in stream:
        if first is None:
            first = time.perf_counter()
        tokens.append(t)
    end = time.perf_counter()
    return tokens, (first or end) - start, end - (first or end)


def fresh_memory() -> None:
    mx.clear_cache()
    mx.reset_peak_memory()


def run_ours(pair: Pair, prompt: list, max_tokens: int, policy, draft_filter=None) -> Run:
    fresh_memory()
    stats = Stats()
    stream = generate_tokens(pair, prompt, max_tokens, policy, (), stats, Sampling(seed=0), draft_filter=draft_filter)
    tokens, ttft, seconds = timed(t for t, _ in stream)
    return Run(tokens, ttft, seconds, mx.get_peak_memory(), stats)


def run_mlx_lm(pair: Pair, tokenizer, prompt: list, max_tokens: int) -> Run:
    from mlx_lm import stream_generate

    fresh_memory()
    stream = stream_generate(pair.target, tokenizer, mx.array(prompt, mx.uint32), max_tokens=max_tokens)
    tokens, ttft, seconds = timed(r.token for r in stream)
    return Run(tokens, ttft, seconds, mx.get_peak_memory())


# --- the cost of a round's parts -------------------------------------------------------------


def median_time(fn: Callable, repeats: int) -> float:
    fn()  # warm-up: allocation, first-use costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def queued_time(fn: Callable, repeats: int) -> float:
    """Seconds per call of `fn` (which returns unevaluated arrays) when each call is queued before
    the one before it is read, as the engine queues its rounds: the device's cost of the graph,
    with the host's building of the next one off the critical path."""
    mx.eval(fn())  # warm-up
    start, last = time.perf_counter(), None
    for _ in range(repeats):
        out = fn()
        mx.async_eval(out)
        if last is not None:
            mx.eval(last)
        last = out
    mx.eval(last)
    return (time.perf_counter() - start) / repeats


@dataclass
class StepCosts:
    plain: float  # one target token, argmax included
    verify: dict  # k -> seconds for verifying k + 1 tokens
    draft: dict  # k -> seconds for a k-step draft block, as the loop runs it
    draft_eager: dict = field(default_factory=dict)  # ... without mx.compile, for comparison
    # the same graphs queued back to back (queued_time): no host synchronization inside
    plain_queued: Optional[float] = None
    verify_queued: dict = field(default_factory=dict)
    draft_queued: dict = field(default_factory=dict)

    def round(self, k: int) -> float:
        return self.plain if k == 0 else self.verify[k] + self.draft[k]

    def round_queued(self, k: int) -> float:
        return self.plain_queued if k == 0 else self.verify_queued[k] + self.draft_queued[k]


def measure_steps(pair: Pair, context: list, ks: list, repeats: int = 3, batch: int = 1) -> StepCosts:
    """Time draft-only and verify-only graphs of the rounds' shapes, for `batch` rows each
    holding `context`."""
    view = pair.view
    one = view.make_cache()
    reserve(one, len(context) + max(ks, default=0) + 1)
    hidden = view.hidden(mx.array(context[:-1], mx.uint32)[None], one)[:, -1:]
    mx.eval(hidden, [c.state for c in one])
    cache = concat_rows([one] * batch)
    hidden = mx.concatenate([hidden] * batch)
    token = mx.full((batch, 1), context[-1], mx.int32)
    mx.eval(hidden, [c.state for c in cache])
    offset = cache[0].offset
    state = Batch(list(range(batch)), cache, token, hidden, mx.zeros((batch,), mx.uint32))
    groups = [(Greedy(Sampling()), list(range(batch)))]

    def verify_graph(n):  # as the loop runs it: through Pair.verify, compiled once the shape is hot
        _, logits = pair.verify(mx.concatenate([token] * n, axis=1), cache)
        set_offset(cache, offset)
        return mx.argmax(logits, axis=-1)

    def verify(n):
        mx.eval(verify_graph(n))

    for n in [1] + [k + 1 for k in ks]:
        for _ in range(HOT_SHAPE):
            verify(n)

    def draft_graph(k):
        return draft_block(pair, state, groups, offset, k)[0]

    def draft(k):
        mx.eval(draft_graph(k))

    def draft_times():
        return {k: median_time(lambda: draft(k), repeats) for k in ks} if pair.drafter is not None else {}

    plain = median_time(lambda: verify(1), repeats)
    verify_times = {k: median_time(lambda: verify(k + 1), repeats) for k in ks}
    loop_draft = draft_times()
    compiled, pair.compile_draft = pair.compile_draft, False
    try:
        eager_draft = draft_times() if compiled else loop_draft
    finally:
        pair.compile_draft = compiled
    queued = 4 * repeats  # short graphs: more of them, so the pipeline's ends weigh little
    plain_queued = queued_time(lambda: verify_graph(1), queued)
    verify_queued = {k: queued_time(lambda: verify_graph(k + 1), queued) for k in ks}
    draft_queued = {k: queued_time(lambda: draft_graph(k), queued) for k in ks} if pair.drafter is not None else {}
    return StepCosts(plain, verify_times, loop_draft, eager_draft, plain_queued, verify_queued, draft_queued)


def median_steps(runs: list) -> StepCosts:
    def med(values):
        return statistics.median(values)

    return StepCosts(
        med([r.plain for r in runs]),
        {k: med([r.verify[k] for r in runs]) for k in runs[0].verify},
        {k: med([r.draft[k] for r in runs]) for k in runs[0].draft},
        {k: med([r.draft_eager[k] for r in runs]) for k in runs[0].draft_eager},
        med([r.plain_queued for r in runs]) if runs[0].plain_queued is not None else None,
        {k: med([r.verify_queued[k] for r in runs]) for k in runs[0].verify_queued},
        {k: med([r.draft_queued[k] for r in runs]) for k in runs[0].draft_queued},
    )


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class BenchOptions:
    tokens: int = 64
    repeats: int = 3
    ks: list = field(default_factory=lambda: list(range(1, 9)))
    adaptive: bool = True
    mlx_lm: bool = True
    inject: Optional[list] = None
    seed: int = 0
    step_repeats: int = 3


def device_description() -> str:
    """What MLX computes on: "cpu" or "gpu (its name)"."""
    device = mx.default_device()
    name = mx.device_info().get("device_name", "") if hasattr(mx, "device_info") else ""
    return f"{device.type.name}" + (f" ({name})" if name and device.type == mx.gpu else "")


def weight_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def rotated(jobs: list, rep: int) -> list:
    """`jobs` starting one later each repeat: a job's place in a repeat's order (first after the
    step timings, after another setting's shapes) changes its timing, and over a multiple of
    len(jobs) repeats every job holds every place once."""
    shift = rep % len(jobs)
    return jobs[shift:] + jobs[:shift]


def paired_ratio(rates: list, base_rates: list) -> float:
    """Median over repeats of rate / base rate in the same repeat: the machine's drift between
    repeats cancels in each pair."""
    return statistics.median(r / b for r, b in zip(rates, base_rates) if b)


def summarize(runs: list) -> dict:
    """Median decode rate and TTFT over repeats, summed over prompts per repeat."""
    rates, ttfts = [], []
    for per_prompt in runs:
        tokens = sum(len(r.tokens) - 1 for r in per_prompt)
        seconds = sum(r.decode_seconds for r in per_prompt)
        rates.append(tokens / seconds if seconds else 0.0)
        ttfts.append(statistics.mean(r.ttft for r in per_prompt))
    return {
        "tokens_per_second": statistics.median(rates),
        "all_tokens_per_second": rates,
        "ttft_seconds": statistics.median(ttfts),
        "peak_memory_bytes": max(r.peak_memory_bytes for per_prompt in runs for r in per_prompt),
    }


def mtp_entry(k, runs: list, plain: dict, steps: StepCosts, drafter_bytes: int, plain_tokens: list, opts) -> dict:
    entry = {"num_draft_tokens": k if k != "adaptive" else "adaptive", **summarize(runs)}
    entry["acceptance_injected"] = opts.inject is not None
    entry["speedup"] = paired_ratio(entry["all_tokens_per_second"], plain["all_tokens_per_second"])
    entry["ttft_over_plain"] = entry["ttft_seconds"] / plain["ttft_seconds"]
    entry["peak_over_plain_plus_drafter"] = entry["peak_memory_bytes"] / (plain["peak_memory_bytes"] + drafter_bytes)
    all_stats = [r.stats for per_prompt in runs for r in per_prompt]
    max_k = max(opts.ks + [8])
    drafted = [0] * max_k
    accepted = [0] * max_k
    log, rounds, generated, round_seconds, ks_used = [], 0, 0, [], []
    for s in all_stats:
        for j, (d, a) in enumerate(zip(s.drafted_per_position[:max_k], s.accepted_per_position[:max_k])):
            drafted[j] += d
            accepted[j] += a
        log += s.round_log
        rounds += s.rounds
        generated += s.generated_tokens - 1
        round_seconds += s.round_seconds[1:]  # the first round also carries the first token's handoff
        # K of every round: drafting rounds are in round_log, plain ones (K = 0) are not
        ks_used += [len(d) for d, _ in s.round_log] + [0] * (s.rounds - len(s.round_log))
    entry["acceptance_per_position"] = [a / d if d else None for a, d in zip(accepted, drafted)]
    entry["conditional_acceptance_per_position"] = conditional_acceptance(log, max_k)
    entry["rounds"] = rounds
    entry["tokens_per_round"] = generated / rounds if rounds else 0.0
    entry["accepted_per_round"] = entry["tokens_per_round"] - 1
    entry["k_histogram"] = {str(n): ks_used.count(n) for n in sorted(set(ks_used))}
    ideal_time = sum(steps.round(n) for n in ks_used)
    entry["ideal_speedup"] = generated * steps.plain / ideal_time if ideal_time else None
    entry["measured_over_ideal"] = entry["speedup"] / entry["ideal_speedup"] if entry["ideal_speedup"] else None
    mean_round = statistics.mean(round_seconds) if round_seconds else None
    parts_draft = statistics.mean(steps.draft.get(n, 0.0) for n in ks_used) if ks_used else 0.0
    parts_verify = statistics.mean(steps.round(n) - steps.draft.get(n, 0.0) for n in ks_used) if ks_used else 0.0
    entry["cost_split"] = {
        "round_seconds": mean_round,
        "draft_seconds": parts_draft,
        "verify_seconds": parts_verify,
        "host_seconds": None if mean_round is None else mean_round - parts_draft - parts_verify,
    }
    entry["matches_plain"] = all(r.tokens == p for per_prompt in runs for r, p in zip(per_prompt, plain_tokens))
    return entry


def bench(pair: Pair, tokenizer, prompts: list, opts: BenchOptions, log=print) -> dict:
    """Run every setting on every prompt, interleaved over `opts.repeats`; return the report."""
    if pair.drafter is None:
        raise ValueError("the bench needs a pair with a drafter")
    vocab = pair.view.args.vocab_size
    settings = [0] + list(opts.ks) + (["adaptive"] if opts.adaptive else [])
    max_k = max(opts.ks) if opts.ks else 8

    # the plain path's output: what every MTP run must reproduce, and the injected drafts' source
    extra = max(opts.ks + [8]) + 2
    continuations = [run_ours(pair, p, opts.tokens + extra, 0).tokens for p in prompts]
    plain_tokens = [c[: opts.tokens] for c in continuations]
    filters = [
        InjectedAcceptance(c, len(p), opts.inject, vocab, opts.seed + i) if opts.inject is not None else None
        for i, (p, c) in enumerate(zip(prompts, continuations))
    ]

    # one controller for every adaptive run, as the engine keeps one per loaded pair: the repeats
    # measure it after what it learnt in the earlier runs (the warm-up included)
    adaptive = AdaptiveDraft(max_k=max_k)

    def policy(k):
        return adaptive if k == "adaptive" else k

    # every K up to the largest: the adaptive policy and the last rounds of a run use them too
    context = prompts[0] + continuations[0][: opts.tokens // 2]
    step_runs = []

    def time_steps():
        # timed once per repeat, between the runs, so a busy machine skews parts and runs alike
        step_runs.append(measure_steps(pair, context, list(range(1, max_k + 1)), opts.step_repeats))

    # warm-up: one short run of each setting
    for k in settings:
        run_ours(pair, prompts[0], min(4, opts.tokens), policy(k), filters[0])
    if opts.mlx_lm:
        run_mlx_lm(pair, tokenizer, prompts[0], min(4, opts.tokens))

    runs = {k: [] for k in settings}
    runs["mlx_lm"] = []
    jobs = [(k, lambda k=k: [run_ours(pair, p, opts.tokens, policy(k), f) for p, f in zip(prompts, filters)])
            for k in settings]
    if opts.mlx_lm:
        jobs.append(("mlx_lm", lambda: [run_mlx_lm(pair, tokenizer, p, opts.tokens) for p in prompts]))
    for rep in range(opts.repeats):
        time_steps()
        for name, job in rotated(jobs, rep):
            runs[name].append(job())
        log(f"repeat {rep + 1}/{opts.repeats}: plain {summarize(runs[0][-1:])['tokens_per_second']:.2f} tok/s")

    steps = median_steps(step_runs)
    plain = summarize(runs[0])
    drafter_bytes = weight_bytes(pair.drafter)
    report = {
        "acceptance_injected": opts.inject is not None,
        "injected_profile": opts.inject,
        "tokens": opts.tokens,
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "repeats": opts.repeats,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "device": device_description(),
        "openblas_preloaded": openblas_loaded(),
        "target_weight_bytes": weight_bytes(pair.target),
        "drafter_weight_bytes": drafter_bytes,
        "plain_tokens_per_second": plain["tokens_per_second"],
        "plain_ttft_seconds": plain["ttft_seconds"],
        "plain_peak_memory_bytes": plain["peak_memory_bytes"],
        "plain_all_tokens_per_second": plain["all_tokens_per_second"],
        "step_seconds": {
            "plain": steps.plain,
            "verify_k_plus_1": {str(k): v for k, v in steps.verify.items()},
            "draft_block_k": {str(k): v for k, v in steps.draft.items()},
            "draft_block_k_eager": {str(k): v for k, v in steps.draft_eager.items()},
        },
        "draft_compiled": pair.compile_draft,
    }
    if opts.mlx_lm:
        theirs = summarize(runs["mlx_lm"])
        report.update(
            mlx_lm_tokens_per_second=theirs["tokens_per_second"],
            mlx_lm_ttft_seconds=theirs["ttft_seconds"],
            mlx_lm_peak_memory_bytes=theirs["peak_memory_bytes"],
            mlx_lm_all_tokens_per_second=theirs["all_tokens_per_second"],
            plain_over_mlx_lm=paired_ratio(plain["all_tokens_per_second"], theirs["all_tokens_per_second"]),
            mlx_lm_matches_plain=all(r.tokens == p for rr in runs["mlx_lm"] for r, p in zip(rr, plain_tokens)),
        )
    else:
        report["mlx_lm_tokens_per_second"] = None
    report["mtp"] = [
        mtp_entry(k, runs[k], plain, steps, drafter_bytes, plain_tokens, opts) for k in settings if k != 0
    ]
    return report


# --- batches ---------------------------------------------------------------------------------


@dataclass
class BatchRun:
    tokens: list  # per row
    decode_seconds: float  # from the moment every row has joined to the end
    decoded: int  # tokens emitted in that time
    rounds: int
    host_build: float  # seconds spent building and queuing rounds
    device_idle: float  # seconds the device waited for the host between rounds
    stats: list
    ks: list = field(default_factory=list)  # K of each round in the timed window


def run_batch(pair: Pair, prompts: list, max_tokens: int, k, filters: list, pipelined: bool = True,
              controllers: Optional[AdaptivePolicies] = None) -> BatchRun:
    """The prompts as rows of one batch (greedy); timed from the moment every row has joined.
    `k`: a draft length, "adaptive" (with `controllers`, adaptive policies per batch size of the
    caller's: the engine's own are the pair's) or a policy object used at every batch size."""
    from mlx_gemma_mtp.runtime.engine import Engine, Request

    fresh_memory()
    if hasattr(k, "choose"):
        policies = EveryBatch(k)
    elif k == "adaptive" and controllers is not None:
        policies = controllers  # as the engine's: rows that finish early leave a smaller B, whose rounds cost less
    else:
        policies = None
    eng = Engine(pair, k if policies is None else 0, pipelined=pipelined, policies=policies)
    eng.trace = []
    uids = [eng.insert(p, Request(max_tokens, Sampling(), frozenset(), None, f)) for p, f in zip(prompts, filters)]
    stats = [eng.rows[u].stats for u in uids]
    out = {u: [] for u in uids}
    start, decoded, first_round = None, 0, None
    while eng.busy:
        events = eng.step()
        for e in events:
            out[e.uid] += e.tokens
            decoded += len(e.tokens) if start is not None else 0
        if start is None and not eng.waiting:
            start, first_round = time.perf_counter(), eng.rounds
    seconds = time.perf_counter() - start
    submits = {n: (t[0], t[1], t[2]) for what, n, *t in eng.trace if what == "submit"}
    ks = {n: t[3] for what, n, *t in eng.trace if what == "submit"}
    reads = {n: times[0] for what, n, *times in eng.trace if what == "read"}
    steady = [n for n in sorted(reads) if n > first_round and n + 1 in submits]
    # building a round's graph (not queuing it: on the CPU, queuing waits for room behind the
    # round before)
    build = sum(submits[n][1] - submits[n][0] for n in steady)
    # idle: the device waits from a round's results to the next round's graph, when that graph
    # was only started after the results were in
    idle = sum(max(0.0, submits[n + 1][1] - reads[n]) for n in steady if submits[n + 1][0] >= reads[n])
    timed = [ks[n] for n in sorted(reads) if n > first_round]
    return BatchRun([out[u] for u in uids], seconds, decoded, len(steady), build, idle, stats, timed)


def bench_batches(pair: Pair, prompts: list, opts: BenchOptions, batches: list, log=print) -> dict:
    """Per batch size B: B prompts (each repeat the next B, in turn) as rows of one batch, plain
    and MTP (each K of opts.ks and adaptive), beside the same prompts decoded one after another;
    interleaved over the repeats. Greedy; every row's output is checked against its own
    single-stream plain run."""
    vocab = pair.view.args.vocab_size
    extra = max(opts.ks + [8]) + 2
    continuations = [run_batch(pair, [p], opts.tokens + extra, 0, [None]).tokens[0] for p in prompts]
    filters = [
        InjectedAcceptance(c, len(p), opts.inject, vocab, opts.seed + i) if opts.inject is not None else None
        for i, (p, c) in enumerate(zip(prompts, continuations))
    ]
    settings = [0] + list(opts.ks) + (["adaptive"] if opts.adaptive else [])
    # the adaptive policy's controllers per B, kept across repeats as the engine keeps them on the
    # pair; read-then-queue rounds are timed differently: they keep their own
    max_k = max(opts.ks + [8])
    controllers = {"pipelined": AdaptivePolicies(max_k), "unpipelined": AdaptivePolicies(max_k)}

    def run(rows, k, row_filters, pipelined=True, tokens=opts.tokens):
        return run_batch(pair, rows, tokens, k, row_filters, pipelined,
                         controllers["pipelined" if pipelined else "unpipelined"])

    def sequential(rows, row_filters, k):  # the rows one after another, as one run
        singles = [run([p], k, [f]) for p, f in zip(rows, row_filters)]
        return BatchRun([s.tokens[0] for s in singles], sum(s.decode_seconds for s in singles),
                        sum(s.decoded for s in singles), sum(s.rounds for s in singles),
                        sum(s.host_build for s in singles), sum(s.device_idle for s in singles),
                        [s.stats[0] for s in singles], [k for s in singles for k in s.ks])

    context = prompts[0] + continuations[0][: opts.tokens // 2]
    report = {"acceptance_injected": opts.inject is not None, "injected_profile": opts.inject,
              "tokens": opts.tokens, "repeats": opts.repeats, "device": device_description(),
              "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
              "openblas_preloaded": openblas_loaded(), "batches": []}
    for batch in batches:
        for k in settings:  # warm-up: traces, allocations
            run(prompts[:batch], k, filters[:batch], tokens=min(8, opts.tokens))
        runs = {k: [] for k in settings}
        runs["unpipelined"], runs["sequential_plain"], runs["sequential_adaptive"] = [], [], []
        steps, expected, taken = [], [], []
        for rep in range(opts.repeats):
            # each repeat its own B prompts, taken in turn: the best fixed K is then the best one
            # over several texts, as a user would pick it, not the one that suits a single text
            at = [(rep * batch + i) % len(prompts) for i in range(batch)]
            taken.append(at)
            rows, row_filters = [prompts[i] for i in at], [filters[i] for i in at]
            expected.append([continuations[i][: opts.tokens] for i in at])
            steps.append(measure_steps(pair, context, list(range(1, max(opts.ks + [8]) + 1)), opts.step_repeats, batch))
            jobs = [(k, lambda k=k: run(rows, k, row_filters)) for k in settings]
            if opts.adaptive:
                jobs.append(("unpipelined", lambda: run(rows, "adaptive", row_filters, pipelined=False)))
            jobs += [("sequential_plain", lambda: sequential(rows, row_filters, 0)),
                     ("sequential_adaptive", lambda: sequential(rows, row_filters, "adaptive"))]
            for name, job in rotated(jobs, rep):
                runs[name].append(job())
        step = median_steps(steps)
        entry = {"batch": batch, "step_seconds": {
            "plain": step.plain, "verify_k_plus_1": {str(k): v for k, v in step.verify.items()},
            "draft_block_k": {str(k): v for k, v in step.draft.items()}, "plain_queued": step.plain_queued,
            "verify_k_plus_1_queued": {str(k): v for k, v in step.verify_queued.items()},
            "draft_block_k_queued": {str(k): v for k, v in step.draft_queued.items()}},
            "prompts_per_repeat": taken,
            "settings": {}}
        plain_rates = [r.decoded / r.decode_seconds for r in runs[0]]
        for name, rs in runs.items():
            if not rs:
                continue
            rates = [r.decoded / r.decode_seconds for r in rs]
            ks_used = [len(d) for r in rs for s in r.stats for d, _ in s.round_log]
            ks_used += [0] * (sum(s.rounds for r in rs for s in r.stats) - len(ks_used))
            rounds = sum(s.rounds for r in rs for s in r.stats)
            generated = sum(s.generated_tokens - 1 for r in rs for s in r.stats)
            per_round = generated / rounds if rounds else 0.0
            e = {
                "tokens_per_second": statistics.median(rates),
                "over_batched_plain": paired_ratio(rates, plain_rates),
                "tokens_per_round_per_row": per_round,
                "host_build_share": sum(r.host_build for r in rs) / max(sum(r.decode_seconds for r in rs), 1e-9),
                "device_idle_share": sum(r.device_idle for r in rs) / max(sum(r.decode_seconds for r in rs), 1e-9),
                "matches_plain": all(t == x for r, want in zip(rs, expected) for t, x in zip(r.tokens, want)),
                # how often each K ran (a row's rounds): where an adaptive setting spent its rounds
                "rounds_per_k": {str(k): ks_used.count(k) for k in sorted(set(ks_used))},
            }
            if isinstance(name, int) or name in ("adaptive", "unpipelined"):
                # ideal: the timed rounds at the parts' costs measured at this B (verify B x (K+1)
                # tokens, K draft steps), against batched plain steps for the same tokens
                ideal_time = sum(step.round(n) for r in rs for n in r.ks)
                plain_time = sum(r.decoded for r in rs) / batch * step.plain
                e["ideal_over_batched_plain"] = plain_time / ideal_time if ideal_time else None
                e["measured_over_ideal"] = (e["over_batched_plain"] / e["ideal_over_batched_plain"]
                                            if e.get("ideal_over_batched_plain") else None)
                # the same with every part timed queued back to back (queued_time): timed with one
                # synchronization each, the parts carry host time the pipelined loop means to hide
                # (a K-step draft block most of all), so that ideal understates the device's
                queued_rounds = sum(step.round_queued(n) for r in rs for n in r.ks)
                e["queued_ideal_over_batched_plain"] = (sum(r.decoded for r in rs) / batch * step.plain_queued
                                                        / queued_rounds if queued_rounds else None)
                e["measured_over_queued_ideal"] = (e["over_batched_plain"] / e["queued_ideal_over_batched_plain"]
                                                   if e.get("queued_ideal_over_batched_plain") else None)
            entry["settings"][str(name)] = e
        report["batches"].append(entry)
        log(f"B={batch}: " + ", ".join(f"{n} {v['tokens_per_second']:.1f} tok/s" for n, v in entry["settings"].items()))
    return report


def format_batches(report: dict) -> str:
    lines = [f"acceptance: {'injected ' + str(report['injected_profile']) if report['acceptance_injected'] else 'the drafter own (not injected)'}",
             f"{report['machine']}; {report['device']}; OpenBLAS preloaded: {report['openblas_preloaded']}; "
             f"{report['tokens']} tokens per row, median of {report['repeats']} repeats",
             "ideal: from the parts timed with one synchronization each; queued: from the parts queued back to back (bench.queued_time)",
             "", "B | setting | aggregate tok/s | x batched plain | ideal | meas/ideal | queued ideal | meas/queued ideal | tok/round/row | host build share | device idle share | same output",
             "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for entry in report["batches"]:
        for name, e in entry["settings"].items():
            label = {"0": "plain", "unpipelined": "adaptive, not pipelined"}.get(name, name if not name.isdigit() else f"K={name}")
            lines.append(" | ".join([
                str(entry["batch"]), label, f"{e['tokens_per_second']:.2f}", f"{e['over_batched_plain']:.2f}",
                f"{e['ideal_over_batched_plain']:.2f}" if e.get("ideal_over_batched_plain") else "-",
                f"{e['measured_over_ideal']:.2f}" if e.get("measured_over_ideal") else "-",
                f"{e['queued_ideal_over_batched_plain']:.2f}" if e.get("queued_ideal_over_batched_plain") else "-",
                f"{e['measured_over_queued_ideal']:.2f}" if e.get("measured_over_queued_ideal") else "-",
                f"{e['tokens_per_round_per_row']:.2f}", f"{e['host_build_share']:.3f}", f"{e['device_idle_share']:.3f}",
                str(e["matches_plain"])]))
    return "\n".join(lines)
