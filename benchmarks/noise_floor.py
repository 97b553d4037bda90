"""How far two identical runs differ on this machine: plain batched decoding against itself.

    python benchmarks/noise_floor.py [--batch 1,4] [--pairs 12] [--tokens 128]

Each pair runs the same B prompts (taken in turn, as `gemma-mtp bench --batch` does) twice in a
row with plain decoding, and divides the second run's rate by the first's. Any setting compared
against batched plain in the bench is read against this spread: a paired ratio whose difference
from 1 is inside it is not a measured difference.
"""

import argparse
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    opts = ap.parse_args()
    from mlx_gemma_mtp.blas import preload_openblas

    preload_openblas(sys.argv[0])
    from mlx_gemma_mtp import demo
    from mlx_gemma_mtp.api import prompt_ids
    from mlx_gemma_mtp.bench import run_batch

    pair, tokenizer = demo.load_demo()
    prompts = [prompt_ids(pair, tokenizer, t) for t in demo.held_out_prompts(8)]
    print(f"demo pair, plain decoding against itself, {opts.tokens} tokens per row, {opts.pairs} pairs")
    for batch in (int(b) for b in opts.batch.split(",")):
        run_batch(pair, prompts[:batch], 16, 0, [None] * batch)  # warm-up
        ratios = []
        for n in range(opts.pairs):
            rows = [prompts[(n * batch + i) % len(prompts)] for i in range(batch)]
            first, second = (run_batch(pair, rows, opts.tokens, 0, [None] * batch) for _ in range(2))
            ratios.append((second.decoded / second.decode_seconds) / (first.decoded / first.decode_seconds))
        ratios.sort()
        print(f"B={batch}: second / first median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-"
              f"{ratios[-1]:.3f}, middle half {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}; "
              f"all: {', '.join(f'{r:.3f}' for r in ratios)}", flush=True)


if __name__ == "__main__":
    main()
