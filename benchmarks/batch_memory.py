"""Memory of a long batched run: rows x tokens on the demo pair, sampled every `--every` rounds.

    python benchmarks/batch_memory.py [--rows 4] [--tokens 2000] [--k adaptive] [--json out.json] [--plot out.png]

Reports MLX's active memory, the caches' own bytes, their difference (what is not the caches),
and the process's resident memory. What is not the caches must stay flat while the caches grow.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.model import demo
from mlx_gemma_mtp.runtime.cache import cache_bytes
from mlx_gemma_mtp.runtime.engine import Engine, Request
from mlx_gemma_mtp.runtime.sampling import Sampling


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--k", default="adaptive")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="needs matplotlib")
    opts = ap.parse_args()

    pair, tokenizer = demo.load_demo()
    k = opts.k if opts.k == "adaptive" else int(opts.k)
    prompts = [tokenizer.encode(p) for p in demo.held_out_prompts(opts.rows)]
    eng = Engine(pair, k)
    for p in prompts:
        eng.insert(p, Request(opts.tokens, Sampling()))  # no EOS: every row runs the full length
    samples, rounds, emitted = [], 0, 0
    while eng.busy:
        emitted += sum(len(e.tokens) for e in eng.step())
        rounds += 1
        if eng.batch is not None and rounds % opts.every == 0:
            mx.eval([c.state for c in eng.batch.cache])
            active, caches = mx.get_active_memory(), cache_bytes(eng.batch.cache)
            samples.append({"round": rounds, "tokens_per_row": emitted // opts.rows, "active_bytes": active,
                            "cache_bytes": caches, "not_cache_bytes": active - caches, "rss_bytes": resident_bytes()})
    first, last = samples[0], samples[-1]
    print(f"{opts.rows} rows x {opts.tokens} tokens, K={opts.k}, {rounds} steps")
    print("tokens/row | active MB | caches MB | active - caches MB | RSS MB")
    for s in samples[:: max(1, len(samples) // 12)] + [last]:
        print(f"{s['tokens_per_row']} | {s['active_bytes'] / 1e6:.1f} | {s['cache_bytes'] / 1e6:.1f} | "
              f"{s['not_cache_bytes'] / 1e6:.1f} | {s['rss_bytes'] / 1e6:.1f}")
    growth = last["not_cache_bytes"] - first["not_cache_bytes"]
    print(f"beyond the caches: {growth / 1e6:+.2f} MB from the first sample to the last; "
          f"caches {first['cache_bytes'] / 1e6:.1f} -> {last['cache_bytes'] / 1e6:.1f} MB")
    report = {"rows": opts.rows, "tokens": opts.tokens, "k": opts.k, "samples": samples}
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
    if opts.plot:
        plot(report, opts.plot)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["samples"]
    x = [v["round"] for v in s]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("active_bytes", "MLX active"), ("cache_bytes", "caches"), ("not_cache_bytes", "active - caches")):
        ax.plot(x, [v[key] / 1e6 for v in s], label=label)
    rss = ax.twinx()
    rss.plot(x, [v["rss_bytes"] / 1e6 for v in s], "k--", label="RSS (right)")
    ax.set_xlabel("engine steps")
    ax.set_ylabel("MB")
    rss.set_ylabel("RSS MB")
    ax.set_title(f"demo pair, {report['rows']} rows x {report['tokens']} tokens, K={report['k']}")
    ax.legend(loc="upper left")
    rss.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
