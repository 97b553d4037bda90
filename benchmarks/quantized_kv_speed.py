"""Decode speed with a float, 8-bit and 4-bit KV cache at a long context, plain and MTP, on a random
target with E2B's per-layer shapes (fewer layers, smaller vocabulary, float32) with injected
acceptance; and the drafter's two ways of reading quantized producer K/V (quantized attention on
the triples, or dequantizing what it reads). Every setting runs interleaved in one process over
the repeats (after `--warmup` uncounted ones); ratios are medians of per-repeat ratios. The
prompt is prefilled once in float and quantized for the 8- and 4-bit settings (only decoding is
timed); greedy MTP output is checked against the same cache's plain output.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/quantized_kv_speed.py \
        --context 4096 --tokens 32 --repeats 4 --json benchmarks/results/quantized_kv_speed_4k.json
    ... --context 32768 --tokens 16 --repeats 2 --json benchmarks/results/quantized_kv_speed_32k.json
"""

import argparse
import json
import statistics
import time

import numpy as np

from mlx_gemma_mtp.bench import InjectedAcceptance
from mlx_gemma_mtp.decode import Pair, PromptCache
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.quantized_cache import KVQuant, quantize_cache
from mlx_gemma_mtp.sampling import Sampling
from mlx_gemma_mtp.shapes import random_pair


def prefilled(pair, ids):
    """A float prompt cache holding `ids` (reused by every repeat of a setting: only decoding is timed)."""
    eng = Engine(Pair(pair.target), 0)
    holder = PromptCache(pair.view.make_cache())
    eng.insert(ids, Request(1, Sampling(), prompt_cache=holder))
    while eng.busy:
        eng.step()
    return holder


def quantized_copy(holder, q):
    """The float prompt cache quantized (the same entries a quantized prefill writes, except that
    its later layers' K/V came from float attention: irrelevant to decode speed, and it spares the
    CPU the non-fused quantized prefill, ~6x slower than the float one here)."""
    return PromptCache(quantize_cache(holder.cache, q), list(holder.tokens))


def decode(pair, ids, holder, k, q, tokens, filt):
    """Decode `tokens` after the cached prompt with `pair` (a target-only Pair for K=0); returns
    (tok/s from first token to last, tokens)."""
    saved = holder.cache, list(holder.tokens)
    eng = Engine(pair, k, kv_quant=q)
    eng.insert(ids + [5], Request(tokens, Sampling(), prompt_cache=holder, draft_filter=filt if k else None))
    out, first = [], None
    while eng.busy:
        for e in eng.step():
            if first is None and e.tokens:
                first = time.perf_counter()
            out += e.tokens
    seconds = time.perf_counter() - first
    holder.cache, holder.tokens = saved  # the next repeat starts from the same prompt
    return (len(out) - 1) / seconds, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="repeats run first and not counted")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--inject", default="0.8,0.7,0.6,0.5")
    p.add_argument("--json")
    a = p.parse_args()
    pair = random_pair("e2b", a.layers, a.vocab)
    ids = [2] + np.random.default_rng(0).integers(10, a.vocab, size=a.context - 1).tolist()
    caches = {"float": None, "8-bit": KVQuant(8, 64), "4-bit": KVQuant(4, 64)}
    start = time.perf_counter()
    float_holder = prefilled(pair, ids)
    holders = {name: float_holder if q is None else quantized_copy(float_holder, q) for name, q in caches.items()}
    print(f"prefill of {len(ids)} tokens: {time.perf_counter() - start:.1f} s", flush=True)
    # each cache's own plain continuation after ids + [5] (they differ between caches), for the
    # injected acceptance: the drafter's proposals are replaced by it except where a seeded draw rejects
    # one target-only Pair for plain decoding, reused, so its compiled forward is traced once per
    # cache layout (here, before the timed repeats), as the MTP pair's is
    plain_pair = Pair(pair.target)
    own = {name: decode(plain_pair, ids, holders[name], 0, q, a.tokens, None)[1] for name, q in caches.items()}
    inject = [float(x) for x in a.inject.split(",")]
    settings = [(name, k, deq) for name in caches for k in (0, a.k) for deq in ((False, True) if k and caches[name] else (False,))]
    speeds = {s: [] for s in settings}
    exact = {s: True for s in settings}  # greedy MTP output == the same cache's plain output
    for rep in range(a.warmup + a.repeats):  # the warm-up repeats trace the MTP pair's compiled steps
        for name, k, deq in settings:
            pair.view.drafter_dequantizes = deq
            filt = InjectedAcceptance(own[name], len(ids) + 1, inject, a.vocab, seed=1) if k else None
            tok_s, out = decode(pair if k else plain_pair, ids, holders[name], k, caches[name], a.tokens, filt)
            if rep >= a.warmup:
                speeds[(name, k, deq)].append(tok_s)
            exact[(name, k, deq)] &= out == own[name]
    pair.view.drafter_dequantizes = False
    base = speeds[("float", 0, False)]
    rows = []
    for (name, k, deq), v in speeds.items():
        ratio = statistics.median(x / b for x, b in zip(v, base))
        plain = speeds[(name, 0, False)]
        rows.append({"cache": name, "k": k, "drafter_reads": "dequantized" if deq else "quantized" if name != "float" else "float",
                     "tok_s_median": statistics.median(v), "tok_s": v, "output_equals_plain": exact[(name, k, deq)], "ratio_to_float_plain": ratio,
                     "mtp_over_plain_same_cache": statistics.median(x / b for x, b in zip(v, plain)) if k else None})
        print(f"context {a.context} {name:>6} K={k} drafter reads {rows[-1]['drafter_reads']:>11}: "
              f"{rows[-1]['tok_s_median']:7.2f} tok/s, x{ratio:.2f} of float plain"
              + (f", MTP/plain same cache x{rows[-1]['mtp_over_plain_same_cache']:.2f}" if k else "")
              + ("" if exact[(name, k, deq)] else "  OUTPUT DIFFERS FROM PLAIN"), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "note": "random e2b-shaped float32 pair, injected acceptance, "
                       "2-core CPU shared with other work; quantized caches are the float prefill's cache quantized; "
                       "ratios are medians of per-repeat ratios (settings interleaved within each repeat)"}, f, indent=1)


if __name__ == "__main__":
    main()
