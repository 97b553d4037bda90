"""Whether the adaptive policy sees the landscape it chooses from. On the demo pair, fixed draft
lengths and adaptive run the same prompts in turn (B at a time); each setting's speed is paired
against the best fixed K. For every adaptive round, what the policy predicted when it chose K (the
expected tokens per row, the round's cost) is set beside what the round then gave (its rows' mean
accepted + 1, its timed seconds), per K and over all drafting rounds, for every controller the calls
use (B rows', and the fewer rows' once rows finish: each B has its own).

    python benchmarks/adaptive_estimates.py [--batch 1,4] [--ks 2,3,4,6,8] [--tokens 256]
        [--repeats 3] [--out benchmarks/results/adaptive_estimates_demo]

A setting's speed is tokens over the whole call (prefill included); it is set against the best
fixed K's as the median of the call pairs' ratios (with their quartiles: calls a few seconds apart
differ by 5-10% on a shared CPU) and as all its calls' tokens over their seconds. A fixed K's tokens
per round come from its rows' stats. Each repeat starts the settings' order one later, so over a multiple of
their count every setting runs in every place.
"""

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from mlx_gemma_mtp.runtime import adaptive
from mlx_gemma_mtp.runtime.adaptive import AdaptiveDraft
from mlx_gemma_mtp.bench.run import rotated

sys.path.insert(0, str(Path(__file__).parent))
import serve_bench  # noqa: E402  (write_results)


plain_policy = AdaptiveDraft


class RecordingDraft(AdaptiveDraft):
    """The policy, keeping (K, predicted tokens per row, predicted seconds) per chosen round and
    (K, realized tokens per row, seconds or None) per observed one; rounds are observed in order."""

    def __post_init__(self):
        super().__post_init__()
        self.chosen, self.seen = [], []

    def choose(self, max_k: int) -> int:
        untimed = self._sw == 0 and self._plain_w == 0  # nothing timed yet: its costs are placeholders (1 s)
        k = super().choose(max_k)
        self.chosen.append((k, self.expected_tokens(k), None if untimed else self.cost(k)))
        return k

    def observe(self, k: int, accepted, seconds: float) -> None:
        rows = accepted if isinstance(accepted, (list, tuple)) else [accepted]
        self.seen.append((k, statistics.mean(a + 1 for a in rows) if rows else None, seconds))
        super().observe(k, accepted, seconds)

    def end_call(self) -> None:
        """A call is over: rounds chosen but never read (queued after its last read) are dropped."""
        del self.chosen[len(self.seen):]

    def checks(self) -> dict:
        """Per K (and "all" drafting rounds): rounds, predicted / realized tokens, and predicted /
        measured seconds over the timed ones chosen once the controller had timed a round."""
        pairs = [(c, s) for c, s in zip(self.chosen, self.seen) if c[0] == s[0] and s[1] is not None]
        out = {}
        for key in sorted({c[0] for c, _ in pairs if c[0] > 0}) + ["all"]:
            group = [(c, s) for c, s in pairs if (c[0] == key if key != "all" else c[0] > 0)]
            timed = [(c[2], s[2]) for c, s in group if s[2] and c[2] is not None]
            out[str(key)] = {
                "rounds": len(group),
                "predicted_tokens": statistics.mean(c[1] for c, _ in group),
                "realized_tokens": statistics.mean(s[1] for _, s in group),
                "timed_rounds": len(timed),
                "predicted_ms": statistics.mean(t[0] for t in timed) * 1e3 if timed else None,
                "measured_ms": statistics.mean(t[1] for t in timed) * 1e3 if timed else None,
            }
        out["k_mismatched"] = sum(c[0] != s[0] for c, s in zip(self.chosen, self.seen))  # 0: rounds paired right
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--ks", default="2,3,4,6,8")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write OUT.txt and OUT.json")
    opts = ap.parse_args()
    from mlx_gemma_mtp.bench.blas import preload_openblas

    preload_openblas(sys.argv[0])  # float32 matmuls of several tokens: see measuring.md
    from mlx_gemma_mtp.model import demo
    from mlx_gemma_mtp.api import batch_generate, prompt_ids

    pair, tokenizer = demo.load_demo()
    prompts = [prompt_ids(pair, tokenizer, t) for t in demo.held_out_prompts(opts.prompts)]
    ks = [int(k) for k in opts.ks.split(",")]
    settings = ks + ["adaptive"]
    report = {"model": "demo pair, held-out prompts", "tokens": opts.tokens, "repeats": opts.repeats, "batches": []}
    lines = [f"{report['model']}; {opts.prompts} prompts x {opts.tokens} tokens, B at a time, {opts.repeats} repeats; "
             "speed over the best fixed K (paired median); the policy's predictions against its rounds"]
    for batch in [int(b) for b in opts.batch.split(",")]:
        pair.adaptive.clear()
        for s in settings:  # warm-up: every shape met before the timed runs
            batch_generate(pair, tokenizer, prompts[:batch], max_tokens=32, num_draft_tokens=s)
        pair.adaptive.clear()
        adaptive.AdaptiveDraft = RecordingDraft  # every controller the engine makes records (B rows and the tail's fewer)
        rates, per_round = defaultdict(list), defaultdict(list)
        totals = defaultdict(lambda: [0, 0.0])  # setting -> [tokens, seconds] over all its calls
        for rep in range(opts.repeats):
            for i in range(0, len(prompts), batch):
                group = prompts[i : i + batch]
                for s in rotated(settings, rep):  # no place in the order favours a setting
                    start = time.perf_counter()
                    r = batch_generate(pair, tokenizer, group, max_tokens=opts.tokens, num_draft_tokens=s)
                    seconds, tokens = time.perf_counter() - start, sum(len(t) for t in r.tokens)
                    rates[s].append(tokens / seconds)
                    totals[s][0] += tokens
                    totals[s][1] += seconds
                    per_round[s] += [st.tokens_per_round for st in r.stats]
                    for policy in (pair.adaptive.controller(b) for b in pair.adaptive.batch_sizes()):
                        policy.end_call()
        best = max(ks, key=lambda k: statistics.median(rates[k]))
        aggregate = {s: tokens / seconds for s, (tokens, seconds) in totals.items()}
        rows = {}
        for s in settings:
            paired = sorted(a / b for a, b in zip(rates[s], rates[best]))
            rows[str(s)] = {"tokens_per_second": statistics.median(rates[s]),
                            "over_best_fixed": statistics.median(paired),
                            "over_best_fixed_quartiles": statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3,
                            "aggregate_over_best_fixed": aggregate[s] / aggregate[best],
                            "tokens_per_round_per_row": statistics.mean(per_round[s]),
                            "call_tokens_per_second": rates[s]}
        adaptive.AdaptiveDraft = plain_policy
        entry = {"batch": batch, "best_fixed_k": best, "settings": rows, "controllers": {}}
        lines.append(f"B = {batch}: best fixed K = {best}")
        lines.append("setting | tok/s | over best fixed K: paired median (quartiles) | all calls' tokens over their "
                     "seconds, over best's | tokens per round per row")
        lines += [f"{s} | {e['tokens_per_second']:.1f} | {e['over_best_fixed']:.3f} ("
                  + " ".join(f"{q:.3f}" for q in e["over_best_fixed_quartiles"][::2])
                  + f") | {e['aggregate_over_best_fixed']:.3f} | {e['tokens_per_round_per_row']:.2f}" for s, e in rows.items()]
        for rows_now, policy in sorted(((b, pair.adaptive.controller(b)) for b in pair.adaptive.batch_sizes()), reverse=True):
            checks = policy.checks()
            rounds = Counter(k for k, _, _ in policy.chosen)
            seconds = sum(t for _, _, t in policy.seen if t)
            entry["controllers"][rows_now] = {"rounds_per_k": dict(sorted(rounds.items())), "predictions": checks,
                                              "timed_seconds": seconds}
            lines.append(f"adaptive rounds of {rows_now} rows ({len(policy.chosen)} rounds, {seconds:.1f} s timed) by K | "
                         "rounds | tokens per row: predicted / realized | timed rounds | round ms: predicted / measured")
            if rounds.get(0):
                lines.append(f"0 | {rounds[0]} | - | - | -")
            lines += [f"{k} | {c['rounds']} | {c['predicted_tokens']:.2f} / {c['realized_tokens']:.2f} | {c['timed_rounds']} | "
                      + (f"{c['predicted_ms']:.1f} / {c['measured_ms']:.1f}" if c["timed_rounds"] else "-")
                      for k, c in checks.items() if k != "k_mismatched"]
            lines.append(f"(chosen and observed rounds whose K differ, expected 0: {checks['k_mismatched']})")
        report["batches"].append(entry)
    print("\n".join(lines))
    if opts.out:
        serve_bench.write_results(opts.out, lines, report)


if __name__ == "__main__":
    main()
