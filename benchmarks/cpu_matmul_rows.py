"""What a float32 matmul against one weight matrix costs per number of rows on MLX's CPU backend.

Verification multiplies K+1 rows by every weight matrix where a plain step multiplies one; MTP pays
only where that costs about the same (memory-bound). Run it with and without OpenBLAS preloaded:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/cpu_matmul_rows.py
"""

import argparse
import statistics
import time

import mlx.core as mx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-features", type=int, default=21504)  # the 31B's MLP width
    ap.add_argument("--in-features", type=int, default=5376)  # the 31B's hidden size
    ap.add_argument("--rows", default="1,2,3,5,9")
    ap.add_argument("--repeats", type=int, default=15)
    opts = ap.parse_args()

    weight = mx.random.normal((opts.out_features, opts.in_features))
    mx.eval(weight)
    rows = [int(r) for r in opts.rows.split(",")]
    inputs = {r: mx.random.normal((r, opts.in_features)) for r in rows}
    mx.eval(list(inputs.values()))
    times = {r: [] for r in rows}
    for _ in range(opts.repeats):  # interleaved, so drift hits every row count alike
        for r in rows:
            start = time.perf_counter()
            mx.eval(inputs[r] @ weight.T)
            times[r].append(time.perf_counter() - start)
    one = statistics.median(times[rows[0]])
    print(f"x [M, {opts.in_features}] @ W.T, W [{opts.out_features}, {opts.in_features}] float32 "
          f"({weight.nbytes / 2**20:.0f} MiB), median of {opts.repeats}:")
    for r in rows:
        t = statistics.median(times[r])
        print(f"M={r}: {t * 1e3:.1f} ms = {t / one:.2f}x M={rows[0]}, {weight.nbytes / t / 1e9:.1f} GB/s of weights")


if __name__ == "__main__":
    main()
