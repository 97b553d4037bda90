"""The engine at B = 1 against the previous single-stream loop, in one process, on the same pair.

The previous loop is imported from a checkout of an earlier commit under another package name:

    git worktree add /tmp/previous e36d496
    python benchmarks/engine_vs_previous.py --previous /tmp/previous [--demo | --shape e2b --layers 6]
        [--tokens 128] [--repeats 5] [--ks 0,2,4] [--inject 0.8,0.7,0.6,0.5]

Settings run interleaved; each repeat decodes every prompt with the previous loop and the
engine, and the report gives the median over repeats of the engine's rate over the previous
loop's (paired in the same repeat). Greedy; both must produce the same tokens.
"""

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.bench import InjectedAcceptance
from mlx_gemma_mtp.engine import generate_tokens


def import_previous(root: Path):
    package = root / "mlx_gemma_mtp"
    spec = importlib.util.spec_from_file_location(
        "mtp_previous", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mtp_previous"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("mtp_previous.decode")


def decode_rate(stream) -> tuple:
    tokens, first = [], None
    for t, _ in stream:
        if first is None:
            first = time.perf_counter()
        tokens.append(t)
    return tokens, (len(tokens) - 1) / (time.perf_counter() - first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--previous", type=Path, required=True)
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--shape", default="e2b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ks", default="0,2,4")
    ap.add_argument("--inject", help="injected acceptance profile, e.g. 0.8,0.7,0.6,0.5")
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    from mlx_gemma_mtp.blas import preload_openblas

    preload_openblas(sys.argv[0])  # float32 matmuls of several tokens: see measuring.md

    previous = import_previous(opts.previous.resolve())
    if opts.demo:
        from mlx_gemma_mtp import demo

        pair, tokenizer = demo.load_demo()
        prompts = [tokenizer.encode(p) for p in demo.held_out_prompts(opts.prompts)]
        model = "demo pair, held-out prompts"
    else:
        from mlx_gemma_mtp import shapes

        pair = shapes.random_pair(opts.shape, opts.layers, opts.vocab, seed=0)
        prompts = [[2] + list(range(100 + 40 * i, 131 + 40 * i)) for i in range(opts.prompts)]
        model = f"random float32 {opts.shape} shapes, {opts.layers} layers, vocab {opts.vocab}"
    old_pair = previous.Pair(pair.target, pair.drafter)
    ks = [int(k) for k in opts.ks.split(",")]
    profile = [float(v) for v in opts.inject.split(",")] if opts.inject else None
    plain = [[t for t, _ in generate_tokens(pair, p, opts.tokens + 20, 0)] for p in prompts]
    vocab = pair.view.args.vocab_size

    def new_filter(i):
        return InjectedAcceptance(plain[i], len(prompts[i]), profile, vocab, seed=i) if profile else None

    def old_filter(i):
        # the previous loop passes the round's position as an int
        f = new_filter(i)
        return None if f is None else (lambda drafts, position: f(drafts, mx.array([position])))

    rates = {("previous", k): [] for k in ks} | {("engine", k): [] for k in ks}
    same = True
    for rep in range(opts.repeats + 1):  # the first is a warm-up
        for k in ks:
            old_rate = new_rate = 0.0
            for i, p in enumerate(prompts):
                a, ra = decode_rate(previous.generate_tokens(old_pair, p, opts.tokens, k, (), draft_filter=old_filter(i)))
                b, rb = decode_rate(generate_tokens(pair, p, opts.tokens, k, (), draft_filter=new_filter(i)))
                same &= a == b == plain[i][: opts.tokens]
                old_rate += ra / len(prompts)
                new_rate += rb / len(prompts)
            if rep:
                rates[("previous", k)].append(old_rate)
                rates[("engine", k)].append(new_rate)
    report = {"model": model, "tokens": opts.tokens, "repeats": opts.repeats, "injected": profile,
              "same_tokens": same, "settings": {}}
    print(f"{model}; {opts.tokens} tokens x {len(prompts)} prompts; median of {opts.repeats} repeats; "
          f"injected acceptance {profile}")
    print("K | previous tok/s | engine tok/s | engine / previous (paired median)")
    for k in ks:
        old, new = rates[("previous", k)], rates[("engine", k)]
        ratio = statistics.median(n / o for n, o in zip(new, old))
        report["settings"][str(k)] = {"previous": statistics.median(old), "engine": statistics.median(new),
                                      "engine_over_previous": ratio}
        print(f"{k} | {statistics.median(old):.2f} | {statistics.median(new):.2f} | {ratio:.3f}")
    print(f"same tokens: {same}")
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
