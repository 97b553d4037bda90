"""How far two identical runs differ on this machine: plain batched decoding against itself.

    python benchmarks/noise_floor.py [--batch 1,4] [--pairs 12] [--tokens 128] [--other-process]

Each pair runs the same B prompts (taken in turn, as `gemma-mtp bench --batch` does) twice in a
row with plain decoding, and divides the second run's rate by the first's. Any setting compared
against batched plain in the bench is read against this spread: a paired ratio whose difference
from 1 is inside it is not a measured difference. With --other-process the second run of each pair
is made by a second process with its own copy of the pair (a server's decode is, against
`stream_generate` in serve_bench.py).
"""

import argparse
import json
import statistics
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--other-process", action="store_true", help="the second run of each pair in a second process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    from mlx_gemma_mtp.blas import preload_openblas

    preload_openblas(sys.argv[0])
    from mlx_gemma_mtp import demo
    from mlx_gemma_mtp.api import prompt_ids
    from mlx_gemma_mtp.bench import run_batch

    pair, tokenizer = demo.load_demo()
    prompts = [prompt_ids(pair, tokenizer, t) for t in demo.held_out_prompts(8)]

    def rate(rows: list) -> float:
        done = run_batch(pair, rows, opts.tokens, 0, [None] * len(rows))
        return done.decoded / done.decode_seconds

    if opts.child:  # a prompt index list per line in, a rate per line out
        for line in sys.stdin:
            print(rate([prompts[i] for i in json.loads(line)]), flush=True)
        return
    other = None
    if opts.other_process:
        other = subprocess.Popen([sys.executable, __file__, "--child", "--tokens", str(opts.tokens)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def second_rate(rows: list) -> float:
        if other is None:
            return rate(rows)
        other.stdin.write(json.dumps([prompts.index(r) for r in rows]) + "\n")
        other.stdin.flush()
        return float(other.stdout.readline())

    print(f"demo pair, plain decoding against itself{' in a second process' if other else ''}, {opts.tokens} "
          f"tokens per row, {opts.pairs} pairs")
    for batch in (int(b) for b in opts.batch.split(",")):
        rate(prompts[:batch]), second_rate(prompts[:batch])  # warm-up
        ratios = []
        for n in range(opts.pairs):
            rows = [prompts[(n * batch + i) % len(prompts)] for i in range(batch)]
            first = rate(rows)
            ratios.append(second_rate(rows) / first)
        ratios.sort()
        print(f"B={batch}: second / first median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-"
              f"{ratios[-1]:.3f}, middle half {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}; "
              f"all: {', '.join(f'{r:.3f}' for r in ratios)}", flush=True)
    if other is not None:
        other.stdin.close()
        other.wait(timeout=60)


if __name__ == "__main__":
    main()
