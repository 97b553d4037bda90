"""How far ahead of the device the host can queue work with `mx.async_eval`, on this backend.

The engine builds round n+1's graph while round n runs: that hides the host's work only if
`async_eval(round n)` returns well before round n is done. This times, for a chain of N small
matmuls, how long `async_eval` takes to return and how long an `eval` right after it still waits
(what was left to run), beside a plain `eval` of the same chain.

    python benchmarks/async_depth.py [--ops 10,50,200,800] [--size 256] [--repeats 7]
"""

import argparse
import statistics
import time

import mlx.core as mx


def chain(x: mx.array, w: mx.array, ops: int) -> mx.array:
    for _ in range(ops):
        x = mx.tanh(x @ w)
    return x


def measure(ops: int, size: int, repeats: int) -> dict:
    w = mx.random.normal((size, size)) / size**0.5
    x = mx.random.normal((1, size))
    mx.eval(w, x, chain(x, w, ops))  # warm-up
    returned, left, whole = [], [], []
    for _ in range(repeats):
        y = chain(x, w, ops)
        start = time.perf_counter()
        mx.async_eval(y)
        back = time.perf_counter()
        mx.eval(y)
        done = time.perf_counter()
        returned.append(back - start)
        left.append(done - back)
        y = chain(x, w, ops)
        start = time.perf_counter()
        mx.eval(y)
        whole.append(time.perf_counter() - start)
    r, l, e = (statistics.median(v) for v in (returned, left, whole))
    return {"ops": ops, "async_eval_returns_ms": r * 1e3, "then_eval_waits_ms": l * 1e3, "eval_ms": e * 1e3,
            "share_run_before_async_eval_returns": r / (r + l)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="10,50,200,800")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    opts = ap.parse_args()
    print(f"device: {mx.default_device()}; chains of tanh(x @ W), W {opts.size} x {opts.size}, median of {opts.repeats}")
    print("ops | async_eval returns after (ms) | a following eval waits (ms) | eval alone (ms) | share of the chain's time spent inside async_eval")
    for ops in (int(o) for o in opts.ops.split(",")):
        m = measure(ops, opts.size, opts.repeats)
        print(f"{ops} | {m['async_eval_returns_ms']:.2f} | {m['then_eval_waits_ms']:.2f} | {m['eval_ms']:.2f} | "
              f"{m['share_run_before_async_eval_returns']:.2f}")


if __name__ == "__main__":
    main()
