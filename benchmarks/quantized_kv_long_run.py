"""Memory of one long generation with a quantized KV cache on the demo pair: MLX's active memory,
the process's resident memory (/proc/self/statm) and the cache's own bytes (cache.cache_bytes),
sampled every `--every` emitted tokens. What is not the cache must stay flat while the cache grows.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/quantized_kv_long_run.py \
        --kv-bits 8 --tokens 10000 --json benchmarks/results/quantized_kv_long_run_8bit.json \
        --plot benchmarks/results/quantized_kv_long_run_8bit.png

The demo pair was trained on 4,096-token contexts; this drives the Engine directly (as the API does,
without the API's context check) past that on purpose: it is a memory test, the tokens past 4,096
are not meaningful text. Greedy, no EOS, so the row runs the full length.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp import demo
from mlx_gemma_mtp.cache import cache_bytes
from mlx_gemma_mtp.engine import Engine, Request
from mlx_gemma_mtp.quantized_cache import KVQuant
from mlx_gemma_mtp.sampling import Sampling


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def sample(cache: list, emitted: int, seconds: float) -> dict:
    mx.eval([(c.keys, c.values, c.offset) for c in cache])
    active, held, rss = mx.get_active_memory(), cache_bytes(cache), resident_bytes()
    return {"tokens": emitted, "seconds": seconds, "active_bytes": active, "cache_bytes": held,
            "active_beyond_cache_bytes": active - held, "rss_bytes": rss, "rss_beyond_cache_bytes": rss - held,
            "mlx_buffer_cache_bytes": mx.get_cache_memory()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-bits", type=int, default=8, help="4 or 8; 0 for the float cache")
    ap.add_argument("--kv-group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--k", default="4")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--minutes", type=float, default=12.0, help="stop (and report) after this long")
    ap.add_argument("--eager", action="store_true",
                    help="no mx.compile for the draft step and verification (to see what compiled traces add to RSS)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--txt", type=Path)
    ap.add_argument("--plot", type=Path, help="needs matplotlib")
    opts = ap.parse_args()

    pair, tokenizer = demo.load_demo()
    if opts.eager:
        pair.compile_draft = pair.compile_verify = False
    q = KVQuant(opts.kv_bits, opts.kv_group_size) if opts.kv_bits else None
    k = opts.k if opts.k == "adaptive" else int(opts.k)
    prompt = tokenizer.encode(demo.held_out_prompts(1)[0])
    eng = Engine(pair, k, kv_quant=q)
    # a few tokens of headroom so the row is still in the batch at the last sample
    eng.insert(prompt, Request(opts.tokens + 64, Sampling()))
    samples, emitted, steps, next_at = [], 0, 0, opts.every
    start = time.perf_counter()
    stopped_early = False
    while eng.busy:
        emitted += sum(len(e.tokens) for e in eng.step())
        steps += 1
        if eng.batch is not None and (emitted >= next_at or emitted >= opts.tokens):
            samples.append(sample(eng.batch.cache, emitted, time.perf_counter() - start))
            next_at += opts.every
            if emitted >= opts.tokens:
                break
            if samples[-1]["seconds"] > opts.minutes * 60:
                stopped_early = True
                break
    seconds = time.perf_counter() - start
    first, last = samples[0], samples[-1]
    name = f"{opts.kv_bits}-bit" if q else "float"
    lines = [
        f"demo pair, one row, prompt {len(prompt)} tokens, {emitted} tokens generated ({name} KV cache, group "
        f"{opts.kv_group_size}, K={opts.k}, greedy, no EOS{', eager: no mx.compile' if opts.eager else ''}) in {seconds:.0f} s, {steps} engine steps"
        + (f"; stopped after {opts.minutes} min, before {opts.tokens}" if stopped_early else ""),
        "The demo pair's context is 4,096 tokens: this runs past it on purpose (a memory test; the tokens "
        "past 4,096 are not meaningful).",
        "tokens | cache MB | MLX active MB | active - cache MB | RSS MB | RSS - cache MB | MLX buffer cache MB",
    ]
    for s in samples:
        lines.append(f"{s['tokens']} | {s['cache_bytes'] / 1e6:.2f} | {s['active_bytes'] / 1e6:.2f} | "
                     f"{s['active_beyond_cache_bytes'] / 1e6:.2f} | {s['rss_bytes'] / 1e6:.1f} | "
                     f"{s['rss_beyond_cache_bytes'] / 1e6:.1f} | {s['mlx_buffer_cache_bytes'] / 1e6:.2f}")
    lines.append(
        f"beyond the cache, first sample ({first['tokens']} tokens) -> last ({last['tokens']} tokens): MLX active "
        f"{first['active_beyond_cache_bytes'] / 1e6:.2f} -> {last['active_beyond_cache_bytes'] / 1e6:.2f} MB "
        f"({(last['active_beyond_cache_bytes'] - first['active_beyond_cache_bytes']) / 1e6:+.2f}), RSS "
        f"{first['rss_beyond_cache_bytes'] / 1e6:.1f} -> {last['rss_beyond_cache_bytes'] / 1e6:.1f} MB "
        f"({(last['rss_beyond_cache_bytes'] - first['rss_beyond_cache_bytes']) / 1e6:+.1f}); cache "
        f"{first['cache_bytes'] / 1e6:.2f} -> {last['cache_bytes'] / 1e6:.2f} MB; MLX peak {mx.get_peak_memory() / 1e6:.1f} MB")
    print("\n".join(lines), flush=True)
    report = {"kv_bits": opts.kv_bits or None, "eager": opts.eager, "kv_group_size": opts.kv_group_size, "k": opts.k,
              "prompt_tokens": len(prompt), "tokens_requested": opts.tokens, "tokens_generated": emitted,
              "seconds": seconds, "stopped_early": stopped_early, "peak_bytes": mx.get_peak_memory(),
              "samples": samples,
              "note": "demo pair (4,096-token context) driven past its context on purpose: a memory test, tokens "
                      "past 4,096 are not meaningful; 2-core CPU shared with other work, float32, OpenBLAS"}
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=1) + "\n")
    if opts.txt:
        opts.txt.write_text("\n".join(lines) + "\n")
    if opts.plot:
        try:
            plot(report, opts.plot)
        except ImportError:
            print("matplotlib is not importable: no plot")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["samples"]
    x = [v["tokens"] for v in s]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("active_bytes", "MLX active"), ("cache_bytes", "KV cache"),
                       ("active_beyond_cache_bytes", "MLX active - cache")):
        ax.plot(x, [v[key] / 1e6 for v in s], label=label)
    rss = ax.twinx()
    rss.plot(x, [v["rss_beyond_cache_bytes"] / 1e6 for v in s], "k--", label="RSS - cache (right)")
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("MB")
    rss.set_ylabel("RSS - cache, MB")
    bits = f"{report['kv_bits']}-bit" if report["kv_bits"] else "float"
    ax.set_title(f"demo pair, {report['tokens_generated']} tokens, {bits} KV cache, K={report['k']}")
    ax.legend(loc="upper left")
    rss.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
