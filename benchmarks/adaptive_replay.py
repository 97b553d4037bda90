"""The adaptive policy replayed on measured traces: its choices without the machine's noise in the
comparison.

On a shared CPU two runs of one setting land 5-10% apart, so policies that differ by 2-3% cannot be
told apart by timing them. Greedy decoding makes the rest of the problem exact: the text is the
target's whatever K is, and the drafter drafts autoregressively, so a round that starts after n
emitted tokens accepts min(K, depth[n]), where depth[n] is how many of 8 drafts made from that
point match the text. `record` measures, on the demo pair,

- depth[n] for every prompt and every n (one K = 8 round from each point, the prompt extended by
  the plain continuation's first n tokens);
- round times per batch size B and K (0 = plain), as the engine times rounds for the policy, from
  the bench's own workload at each fixed K (the drain of rows that finish apart gives B < 4; the
  K's order rotates each repeat, so the machine's drift falls on every K alike); a (B, K) the
  drain seldom meets is timed with every draft rejected (injected), which keeps B rows;

and `replay` runs that workload (prompts B at a time, max_tokens each, the controllers kept across
calls as the engine keeps them) on them: rows advance by their own depth, rows leave when done,
each round's seconds are drawn from its (B, K)'s measured times (or, with a drift, their median
times a wandering machine speed), and the policy sees a round's time one round late and only
when the next round has the same K and B (runtime/engine.py's rule on a CPU). Fixed K meets the same
draws. Not modelled: the cold forwards a K brings when its shapes are new (runtime/pair.py).
`--known-costs` also replays the policy told each (B, K)'s median round time (its cost
estimates replaced, the rest as it is), with its exploring and without: how much of its loss is
in estimating costs from noisy rounds rather than in learning acceptance.

    python benchmarks/adaptive_replay.py record [--prompts 8] [--tokens 256] [--out traces.json]
    python benchmarks/adaptive_replay.py replay traces.json [--batch 1,4] [--repeats 20] [--seeds 8]
        [--drift 0,0.15] [--jitter 0.08] [--known-costs] [--out OUT]
"""

import argparse
import json
import math
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

from mlx_gemma_mtp.runtime.adaptive import AdaptiveDraft, controller_for

sys.path.insert(0, str(Path(__file__).parent))
import serve_bench  # noqa: E402  (write_results)

MAX_K = 8


def record(opts) -> dict:
    from mlx_gemma_mtp.bench.blas import preload_openblas

    preload_openblas(sys.argv[0])  # float32 matmuls of several tokens: see measuring.md
    from mlx_gemma_mtp.model import demo
    from mlx_gemma_mtp.api import prompt_ids
    from mlx_gemma_mtp.bench.run import InjectedAcceptance, rotated, run_batch

    pair, tokenizer = demo.load_demo()
    prompts = [prompt_ids(pair, tokenizer, t) for t in demo.held_out_prompts(opts.prompts)]
    texts = [run_batch(pair, [p], opts.tokens + MAX_K + 2, 0, [None]).tokens[0] for p in prompts]
    depth = json.loads(opts.depth_from.read_text())["depth"] if opts.depth_from else []
    for i, (p, text) in enumerate(zip(prompts, texts) if not depth else []):
        starts = list(range(1, min(opts.tokens, len(text) - MAX_K - 1)))
        row_depth = [None]  # no round starts before the first token
        for at in range(0, len(starts), opts.rows):
            chunk = starts[at : at + opts.rows]
            # the prompt and n - 1 tokens: prefill emits token n, then one round drafts from there
            run = run_batch(pair, [p + text[: n - 1] for n in chunk], MAX_K + 2, MAX_K, [None] * len(chunk))
            for n, out, st in zip(chunk, run.tokens, run.stats):
                drafts, accepted = st.round_log[0]
                assert len(drafts) == MAX_K and out == text[n - 1 : n - 1 + len(out)], (i, n)
                row_depth.append(accepted)
        depth.append(row_depth)
        print(f"prompt {i}: {len(row_depth) - 1} rounds drafted, mean depth {statistics.mean(row_depth[1:]):.2f}", flush=True)
    # round times from the bench's own workload: each K fixed, prompts B at a time with their
    # real acceptance (rows finish apart, so the drain gives the smaller B); the K's order rotates
    # each repeat, so the machine's drift falls on every K alike
    costs = {f"{b},{k}": [] for b in range(1, opts.batch + 1) for k in range(MAX_K + 1)}
    groups = [prompts[i : i + opts.batch] for i in range(0, len(prompts), opts.batch)]
    for k in range(MAX_K + 1):
        run_batch(pair, groups[0], 32, k, [None] * len(groups[0]))  # warm-up: the shapes' traces
    for rep in range(opts.cost_repeats):
        for rows in groups:
            for k in rotated(list(range(MAX_K + 1)), rep):
                timer = Timer(k)
                run_batch(pair, rows, opts.tokens, timer, [None] * len(rows))
                for b, t in timer.rounds:
                    costs[f"{b},{k}"].append(t)
        print(f"repeat {rep + 1}: " + ", ".join(f"{key} {statistics.median(v) * 1e3:.1f}" for key, v in costs.items() if v), flush=True)
    # cells the drain seldom meets (plain rows finish together: K = 0 below B): timed with every
    # draft rejected (injected), which keeps B rows to the end
    vocab = pair.view.args.vocab_size
    for key in [key for key, v in costs.items() if len(v) < 20]:
        b, k = (int(x) for x in key.split(","))
        rows = prompts[:b]
        filters = [InjectedAcceptance(c, len(p), [0.0], vocab, 7 + j) for j, (p, c) in enumerate(zip(rows, texts))]
        run_batch(pair, rows, 16, k, filters)  # warm-up
        timer = Timer(k)
        run_batch(pair, rows, 64, timer, filters)  # rounds near the end draft fewer: Timer keeps K's own
        costs[key] += [t for rows_now, t in timer.rounds if rows_now == b]
        print(f"B = {b}, K = {k}: {len(costs[key])} rounds, median {statistics.median(costs[key]) * 1e3:.1f} ms", flush=True)
    return {"prompts": len(prompts), "tokens": opts.tokens, "lengths": [len(t) for t in texts],
            "depth": depth, "round_seconds": costs}


class Timer:
    """Fixed K, keeping (B, seconds) of every timed round: the engine reports a round's time
    only when it can tell it apart (runtime/engine.py), with as many accepted counts as live rows."""

    def __init__(self, k):
        self.k, self.rounds = k, []

    def choose(self, max_k):
        return min(self.k, max_k)

    def observe(self, k, accepted, seconds):
        if seconds and k == self.k:
            self.rounds.append((len(accepted), seconds))


def replay_call(traces, rows, tokens, policy_for, cost, controllers) -> tuple:
    """One batch_generate call of `rows` (prompt indices): (tokens, seconds, ks)."""
    depth = traces["depth"]
    limit = {r: min(tokens, traces["lengths"][r]) for r in rows}
    emitted = {r: 1 for r in rows}  # the prefill's token
    live, total, seconds, ks = list(rows), len(rows), 0.0, []
    pending = None  # (policy, k, batch, accepted, seconds) of the round queued before this one
    while live:
        b = len(live)
        policy = policy_for(controllers, b)
        room = min(MAX_K, max(limit[r] - emitted[r] - 1 for r in live))
        k = max(0, policy.choose(room)) if room > 0 else 0
        if pending is not None:  # the round before is read now: timed when this one matches it
            p_policy, p_k, p_b, p_acc, p_sec = pending
            p_policy.observe(p_k, p_acc, p_sec if (p_k, p_b) == (k, b) else None)
        t = cost(b, k)
        seconds += t
        ks.append(k)
        accepted = []
        for r in list(live):
            n = emitted[r]
            a = min(k, depth[r][n]) if n < len(depth[r]) else 0
            accepted.append(a)
            got = min(a + 1, limit[r] - n)
            emitted[r] += got
            total += got
            if emitted[r] >= limit[r]:
                live.remove(r)
        pending = (policy, k, b, accepted, t if len(ks) > 1 else None)
    pending[0].observe(pending[1], pending[3], None)
    return total, seconds, ks


class RoundCosts:
    """Round seconds for (B, K): drawn from the measured ones (drift 0), or their median times a
    machine speed that wanders (log speed an AR(1) process, `drift` its standard deviation,
    `memory` its per-round correlation) times an independent lognormal factor (`jitter`). Two
    settings replayed with one seed meet the same speeds and draws."""

    def __init__(self, times: dict, seed: int, drift: float = 0.0, memory: float = 0.97, jitter: float = 0.08):
        self.times, self.rng = times, random.Random(seed)
        self.median = {key: statistics.median(v) for key, v in times.items()}
        self.drift, self.memory, self.jitter, self.speed = drift, memory, jitter, 0.0

    def __call__(self, b: int, k: int) -> float:
        key = f"{b},{k}"
        if not self.drift:
            return self.rng.choice(self.times[key])
        shock = self.rng.gauss(0, 1) * self.drift * math.sqrt(1 - self.memory**2)
        self.speed = self.memory * self.speed + shock
        return self.median[key] * math.exp(self.speed + self.rng.gauss(0, self.jitter))


class KnownCosts(AdaptiveDraft):
    """The policy told every (B, K)'s median round time instead of estimating it from its rounds:
    what its choices are worth when only acceptance has to be learnt."""

    def __init__(self, medians: dict, batch: int, explore: bool):
        super().__init__(max_k=MAX_K)
        self.medians, self.batch = medians, batch
        if not explore:
            self.explore_every = self.first_explore_every = 10**9

    def cost(self, k: int) -> float:
        return self.medians[f"{self.batch},{k}"]


def replay(traces, batch, setting, repeats, seed, tokens, drift=0.0, jitter=0.08) -> dict:
    """The bench's workload for one setting: prompts B at a time, `repeats` times over, with the
    controllers per B kept across calls (runtime/engine.py keeps them on the pair)."""
    cost = RoundCosts(traces["round_seconds"], seed, drift, jitter=jitter)
    controllers = {}
    if setting == "adaptive":
        policy_for = lambda c, b: controller_for(c, b, MAX_K)  # noqa: E731
    elif setting in ("known costs", "known costs, no exploring"):
        def policy_for(c, b):
            if b not in c:
                c[b] = KnownCosts(cost.median, b, explore=setting == "known costs")
            return c[b]
    else:
        fixed = Timer(setting)
        policy_for = lambda c, b: fixed  # noqa: E731
    groups = [list(range(i, min(i + batch, traces["prompts"]))) for i in range(0, traces["prompts"], batch)]
    got, seconds, ks = 0, 0.0, []
    for _ in range(repeats):
        for rows in groups:
            t, s, k = replay_call(traces, rows, tokens, policy_for, cost, controllers)
            got, seconds, ks = got + t, seconds + s, ks + k
    return {"tokens_per_second": got / seconds, "rounds": len(ks),
            "rounds_per_k": {k: ks.count(k) for k in sorted(set(ks))}}


def compare(traces, batch, repeats, seeds, drift, policies=("adaptive",), jitter=0.08) -> dict:
    """Every fixed K and the policies, each seed's draws met by all; each policy over the best fixed K."""
    settings = list(range(MAX_K + 1)) + list(policies)
    runs = [{s: replay(traces, batch, s, repeats, seed, traces["tokens"], drift, jitter) for s in settings} for seed in range(seeds)]
    best = [max(range(MAX_K + 1), key=lambda k: r[k]["tokens_per_second"]) for r in runs]
    over = {p: [r[p]["tokens_per_second"] / r[b]["tokens_per_second"] for r, b in zip(runs, best)] for p in policies}
    return {"batch": batch, "drift": drift, "best_fixed_k": Counter(best).most_common(1)[0][0],
            "tokens_per_second": {str(s): statistics.mean(r[s]["tokens_per_second"] for r in runs) for s in settings},
            "over_best": {p: {"mean": statistics.mean(v), "min": min(v)} for p, v in over.items()},
            "rounds_per_k": {p: runs[0][p]["rounds_per_k"] for p in policies}}


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--prompts", type=int, default=8)
    rec.add_argument("--tokens", type=int, default=256)
    rec.add_argument("--rows", type=int, default=16, help="drafting points per batch while measuring depth")
    rec.add_argument("--batch", type=int, default=4, help="round times for B = 1..this")
    rec.add_argument("--cost-repeats", type=int, default=4)
    rec.add_argument("--depth-from", type=Path, help="take the depths from an earlier recording (same prompts, tokens)")
    rec.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_replay_demo_traces.json"))
    rep = sub.add_parser("replay")
    rep.add_argument("traces", type=Path)
    rep.add_argument("--batch", default="1,4")
    rep.add_argument("--repeats", type=int, default=20)
    rep.add_argument("--seeds", type=int, default=8)
    rep.add_argument("--drift", default="0,0.15", help="sds of the machine's log speed to replay (0: draw measured times)")
    rep.add_argument("--jitter", type=float, default=0.08,
                     help="sd of each round's own log time about the wandering speed (with a drift above 0)")
    rep.add_argument("--known-costs", action="store_true",
                     help="also replay the policy told each (B, K)'s median round time, with and without its exploring")
    rep.add_argument("--out", type=Path, help="write OUT.txt and OUT.json")
    opts = ap.parse_args()
    if opts.command == "record":
        traces = record(opts)
        opts.out.write_text(json.dumps(traces) + "\n")
        print(f"wrote {opts.out}")
        return
    traces = json.loads(opts.traces.read_text())
    lines = [f"replayed: {opts.traces.name}; {traces['prompts']} prompts x {traces['tokens']} tokens, B at a time, "
             + (f"jitter {opts.jitter}, " if opts.jitter != rep.get_default("jitter") else "") +
             f"{opts.repeats} repeats, {opts.seeds} seeds; adaptive over the best fixed K (mean over seeds, min)"]
    report = {"traces": opts.traces.name, "repeats": opts.repeats, "seeds": opts.seeds, "jitter": opts.jitter, "cells": []}
    policies = ["adaptive"] + (["known costs", "known costs, no exploring"] if opts.known_costs else [])
    for batch in [int(b) for b in opts.batch.split(",")]:
        for drift in [float(d) for d in opts.drift.split(",")]:
            cell = compare(traces, batch, opts.repeats, opts.seeds, drift, policies, opts.jitter)
            report["cells"].append(cell)
            rates = cell["tokens_per_second"]
            lines.append(f"B = {batch}, drift {drift}: fixed K " + " ".join(f"{k}:{rates[str(k)]:.0f}" for k in range(MAX_K + 1))
                         + " tok/s; " + "; ".join(f"{p} {rates[p]:.0f}: {cell['over_best'][p]['mean']:.3f} of the best"
                                                  f" (min {cell['over_best'][p]['min']:.3f})" for p in policies))
    print("\n".join(lines))
    if opts.out:
        serve_bench.write_results(opts.out, lines, report)


if __name__ == "__main__":
    main()
