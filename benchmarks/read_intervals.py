"""Which round a read interval belongs to: one row decodes with K fixed at 3, at 0, and alternating
0 and 4; the intervals between the engine's reads are grouped by the K of the round read and by the
K of the round queued just before that read, beside how long async_eval took to queue a round.

    python benchmarks/read_intervals.py demo | e2b:2 | 31b:2     (shape:target layers, random weights)

On Linux preload OpenBLAS (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0).
"""
import statistics
import sys
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.sampling import Sampling

class Alternate:
    def __init__(self, ks): self.ks, self.n = ks, 0
    def choose(self, max_k):
        self.n += 1
        return min(self.ks[self.n % len(self.ks)], max_k)
    def observe(self, k, accepted, seconds): pass

def probe(name, pair, prompt, tokens):
    for ks in ([3], [0], [0, 4]):
        eng = Engine(pair, 0)
        pol = Alternate(ks)
        eng._policy = lambda b: pol
        eng.trace = []
        eng.insert(prompt, Request(tokens, Sampling()))
        while eng.busy:
            eng.step()
        sub = {n: t for what, n, *t in eng.trace if what == "submit"}
        reads = [(n, t[0]) for what, n, *t in eng.trace if what == "read"]
        rows = []
        for (n0, t0), (n1, t1) in zip(reads, reads[1:]):
            if n1 + 1 not in sub:
                continue
            s = sub[n1 + 1]
            rows.append((sub[n1][3], sub[n1 + 1][3], (s[1] - s[0]) * 1e3, (s[2] - s[1]) * 1e3, (t1 - t0) * 1e3))
        rows = rows[3:]
        by_next = {}
        by_this = {}
        for kn, knext, b, q, iv in rows:
            by_this.setdefault(kn, []).append(iv)
            by_next.setdefault(knext, []).append(iv)
        med = lambda d: {k: round(statistics.median(v), 1) for k, v in sorted(d.items())}
        print(name, "ks", ks, "median interval by read round's K", med(by_this), "by next round's K", med(by_next),
              "async_eval ms median", round(statistics.median(r[3] for r in rows), 1),
              "build ms", round(statistics.median(r[2] for r in rows), 1), flush=True)

which = sys.argv[1]
if which == "demo":
    from mlx_gemma_mtp.demo import load_demo, held_out_prompts
    pair, tok = load_demo()
    probe("demo", pair, tok.encode(held_out_prompts(1)[0]), 96)
else:
    from mlx_gemma_mtp import shapes
    name, layers = which.split(":")
    pair = shapes.random_pair(name, int(layers), 32768, seed=0)
    probe(which, pair, list(range(10, 60)), 40)
