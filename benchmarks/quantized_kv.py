"""The quantized KV cache (`--kv-bits`) measured four ways, one subcommand each:

    fidelity   how far an 8-bit and a 4-bit cache move the target: (1) a miniature E2B-variant fixture
               target (tests/reference_models.py, float32): its logits at 1,000 positions of one prompt
               with an 8-bit and a 4-bit cache (group 32, its head dim is 32) against the float cache,
               max |difference| and top-1 agreement; (2) the demo pair: acceptance per position at K=4,
               greedy, on fixed prompts, float vs 8/4-bit. Needs the test extra.
    long-run   memory of one long generation with a quantized KV cache on the demo pair: MLX's active
               memory, the process's resident memory (/proc/self/statm) and the cache's own bytes
               (cache.cache_bytes), sampled every `--every` emitted tokens. What is not the cache must
               stay flat while the cache grows.
    memory     memory of a long prompt with a float, 8-bit and 4-bit KV cache, and the prefill's peak
               for two prefill step sizes, on a random target with E2B's or 31B's per-layer shapes;
               `--cache-only`: the cache bytes of a long context in float16, without a model.
    speed      decode speed with a float, 8-bit and 4-bit KV cache at a long context, plain and MTP,
               on a random target with E2B's per-layer shapes and injected acceptance; and the
               drafter's two ways of reading quantized producer K/V.

On Linux preload OpenBLAS (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0). The runs behind
docs/long-context.md:

    python benchmarks/quantized_kv.py fidelity --json benchmarks/results/quantized_kv_fidelity.json
    python benchmarks/quantized_kv.py long-run --kv-bits 8 --tokens 10000 \\
        --json benchmarks/results/quantized_kv_long_run_8bit.json --txt benchmarks/results/quantized_kv_long_run_8bit.txt \\
        --plot benchmarks/results/quantized_kv_long_run_8bit.png
    python benchmarks/quantized_kv.py memory --shape e2b --layers 6 --prompt 32768 --cache-only \\
        --json benchmarks/results/quantized_kv_cache_bytes_e2b.json
    python benchmarks/quantized_kv.py memory --shape e2b --layers 2 --prompt 32768 --tail 1024 --steps 256,1024 \\
        --json benchmarks/results/quantized_kv_memory_e2b_32k.json
    python benchmarks/quantized_kv.py speed --context 4096 --tokens 32 --repeats 4 \\
        --json benchmarks/results/quantized_kv_speed_4k.json

The demo pair was trained on 4,096-token contexts; `long-run` drives the Engine directly (as the API
does, without the API's context check) past that on purpose: it is a memory test, the tokens past
4,096 are not meaningful text. Greedy, no EOS, so the row runs the full length.

`memory` prefills through the engine (float32 weights and K/V: MLX's CPU float16 matmuls are far
slower; the float rows, kv_bits 16 in the JSON, are the float32 cache), then runs a few decode
rounds. Each of its settings runs in its own process (a clean allocator and peak).

`speed` runs every setting interleaved in one process over the repeats (after `--warmup` uncounted
ones); ratios are medians of per-repeat ratios. The prompt is prefilled once in float and quantized
for the 8- and 4-bit settings (only decoding is timed); greedy MTP output is checked against the
same cache's plain output.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# --- fidelity ------------------------------------------------------------------------------------

DEMO_PROMPTS = ["def parse_args(argv):", "import os\n\n\ndef walk(top):", "class Queue:\n    def __init__(self):",
                "def read_lines(path):\n    with open(path) as f:", "import json\n\n\ndef load(path):",
                "def fib(n):", "class Point:\n    def __init__(self, x, y):", "def merge(a, b):"]


def fixture_logits(positions: int) -> list:
    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import reference_models as ref
    from mlx_gemma_mtp import load
    from mlx_gemma_mtp.convert import convert
    from mlx_gemma_mtp.runtime.quantized_cache import KVQuant

    root = Path(tempfile.mkdtemp())
    target, draft = ref.build_pair("e2b", root)
    convert(str(target), root / "pair", draft=str(draft), dtype="float32", progress=False)
    pair, _ = load(str(root / "pair"))
    view = pair.view
    ids = mx.array([[2] + np.random.default_rng(0).integers(110, 512, size=positions - 1).tolist()], mx.uint32)

    def logits(q):
        cache, out = view.make_cache(1, q), []
        for at in range(0, positions, 100):
            from mlx_gemma_mtp.runtime.cache import reserve
            reserve(cache, at + 100)
            out.append(view.logits(view.hidden(ids[:, at: at + 100], cache)))
            mx.eval(out[-1], [c.state for c in cache])
        return mx.concatenate(out, axis=1)[0]

    ref_logits = logits(None)
    rows = []
    for bits in (8, 4):
        got = logits(KVQuant(bits, 32))
        rows.append({"kv_bits": bits, "positions": positions,
                     "max_abs_logit_diff": mx.abs(got - ref_logits).max().item(),
                     "logit_range": (ref_logits.max() - ref_logits.min()).item(),
                     "top1_agreement": (got.argmax(-1) == ref_logits.argmax(-1)).mean().item()})
        print(rows[-1], flush=True)
    return rows


def demo_acceptance(tokens: int) -> list:
    from mlx_gemma_mtp import stream_generate
    from mlx_gemma_mtp.model.demo import load_demo

    pair, tokenizer = load_demo()
    rows = []
    for bits in (None, 8, 4):
        drafted, accepted = [0] * 4, [0] * 4
        for prompt in DEMO_PROMPTS:
            last = None
            for last in stream_generate(pair, tokenizer, prompt, max_tokens=tokens, num_draft_tokens=4, kv_bits=bits):
                pass
            for i, (d, a) in enumerate(zip(last.stats.drafted_per_position, last.stats.accepted_per_position)):
                drafted[i] += d
                accepted[i] += a
        rows.append({"kv_bits": bits or "float", "acceptance_per_position": [a / d for a, d in zip(accepted, drafted)],
                     "prompts": len(DEMO_PROMPTS), "tokens_each": tokens})
        print(rows[-1], flush=True)
    return rows


def run_fidelity(a) -> None:
    out = {"fixture_e2b_logits": fixture_logits(a.positions), "demo_acceptance_k4": demo_acceptance(a.tokens)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


# --- long-run ------------------------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def sample(cache: list, emitted: int, seconds: float) -> dict:
    import mlx.core as mx

    from mlx_gemma_mtp.runtime.cache import cache_bytes

    mx.eval([(c.keys, c.values, c.offset) for c in cache])
    active, held, rss = mx.get_active_memory(), cache_bytes(cache), resident_bytes()
    return {"tokens": emitted, "seconds": seconds, "active_bytes": active, "cache_bytes": held,
            "active_beyond_cache_bytes": active - held, "rss_bytes": rss, "rss_beyond_cache_bytes": rss - held,
            "mlx_buffer_cache_bytes": mx.get_cache_memory()}


def run_long_run(opts) -> None:
    import mlx.core as mx

    from mlx_gemma_mtp.model import demo
    from mlx_gemma_mtp.runtime.engine import Engine, Request
    from mlx_gemma_mtp.runtime.quantized_cache import KVQuant
    from mlx_gemma_mtp.runtime.sampling import Sampling

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
            plot_long_run(report, opts.plot)
        except ImportError:
            print("matplotlib is not importable: no plot")


def plot_long_run(report: dict, path: Path) -> None:
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


# --- memory --------------------------------------------------------------------------------------


def write_context(cache, args, tokens: int, dtype) -> None:
    """Write `tokens` entries of random K/V into every cache layer, in the shapes and format the
    target writes (the memory of a long context without computing it)."""
    import mlx.core as mx

    from mlx_gemma_mtp.runtime.cache import reserve

    reserve(cache, tokens)
    layers = args.layer_types[: args.num_hidden_layers - args.num_kv_shared_layers]
    for kind, c in zip(layers, cache):
        full = kind == "full_attention"
        dim = args.global_head_dim if full and args.global_head_dim else args.head_dim
        heads = args.num_global_key_value_heads if full and args.attention_k_eq_v and \
            args.num_global_key_value_heads else args.num_key_value_heads
        for at in range(0, tokens, 4096):
            kv = mx.random.normal((1, heads, min(4096, tokens - at), dim)).astype(dtype)
            c.update_and_fetch(kv, kv)
            mx.eval([x.state for x in cache])


def one(shape, layers, vocab, prompt, step, bits, decode, tail):
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_mtp.runtime.cache import cache_bytes
    from mlx_gemma_mtp.runtime.pair import PromptCache
    from mlx_gemma_mtp.runtime.engine import Engine, Request
    from mlx_gemma_mtp.runtime.quantized_cache import KVQuant
    from mlx_gemma_mtp.runtime.sampling import Sampling
    from mlx_gemma_mtp.bench.shapes import random_pair

    pair = random_pair(shape, layers, vocab, experts=4)
    mx.eval(pair.target.parameters())
    weights = mx.get_active_memory()
    ids = [2] + np.random.default_rng(0).integers(10, vocab, size=prompt - 1).tolist()
    quant = None if bits is None else KVQuant(bits, 64)
    eng = Engine(pair, 0, prefill_step=step, kv_quant=quant)
    held = None
    if tail:  # the context before the last `tail` tokens: written, then reused as a prompt cache
        held = PromptCache(pair.view.make_cache(kv_quant=quant), ids[: prompt - tail])
        write_context(held.cache, pair.view.args, prompt - tail, mx.float32)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    eng.insert(ids, Request(decode, Sampling(), prompt_cache=held))
    while eng.batch is None:
        eng.step()
    prefill_s = time.perf_counter() - start
    prefill_peak = mx.get_peak_memory() - weights
    cache = cache_bytes(eng.batch.cache)
    mx.reset_peak_memory()
    while eng.busy:
        eng.step()
    return {"shape": shape, "layers": layers, "prompt_tokens": prompt, "prefill_step_size": step,
            "kv_bits": bits or 16, "weights_bytes": weights, "cache_bytes": cache,
            "tokens_through_the_model": tail or prompt, "active_above_weights_before_prefill_bytes": before - weights,
            "prefill_peak_above_weights_bytes": prefill_peak,
            "prefill_peak_above_weights_and_cache_bytes": prefill_peak - cache,
            "decode_peak_above_weights_bytes": mx.get_peak_memory() - weights, "prefill_seconds": prefill_s}


def cache_only(a):
    import mlx.core as mx

    from mlx_gemma_mtp.runtime.cache import cache_bytes, make_target_cache
    from mlx_gemma_mtp.runtime.quantized_cache import KVQuant, make_quantized_cache
    from mlx_gemma_mtp.bench.shapes import SHAPES, target_args

    args = target_args(SHAPES[a.shape], a.layers, a.vocab, 4)
    rows = []
    for bits in (16, 8, 4):
        cache = make_target_cache(args) if bits == 16 else make_quantized_cache(args, KVQuant(bits, 64))
        write_context(cache, args, a.prompt, mx.float16)
        rows.append({"shape": a.shape, "layers": a.layers, "context": a.prompt, "kv_bits": bits,
                     "cache_bytes": cache_bytes(cache)})
    for r in rows:
        r["ratio_to_float16"] = r["cache_bytes"] / rows[0]["cache_bytes"]
        print(f"{a.shape} L={a.layers} context {a.prompt}: {r['kv_bits']:>2}-bit cache {r['cache_bytes'] / 2**20:8.1f} MiB "
              f"({r['ratio_to_float16']:.3f}x float16)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "note": "float16 K/V written into the caches, no model"}, f, indent=1)


def run_memory(a) -> None:
    if a.one:
        bits, step = (int(x) for x in a.one.split(","))
        print(json.dumps(one(a.shape, a.layers, a.vocab, a.prompt, step, None if bits == 16 else bits, a.decode,
                             a.tail)), flush=True)
        os._exit(0)  # measured and written: skip interpreter teardown (it hung at exit after a 10 GB run here)
    if a.cache_only:
        return cache_only(a)
    rows = []
    steps = [int(s) for s in a.steps.split(",")]
    for step in steps:
        for bits in a.bits.split(","):
            if step != steps[-1] and bits != "4" and len(steps) > 1:
                continue  # the step-size comparison is made on the 4-bit cache; every width at the last step
            out = subprocess.run([sys.executable, __file__, "memory", "--shape", a.shape, "--layers", str(a.layers),
                                  "--vocab", str(a.vocab), "--prompt", str(a.prompt), "--decode", str(a.decode),
                                  "--tail", str(a.tail), "--one", f"{bits},{step}"], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            width = "float32" if r["kv_bits"] == 16 else f"{r['kv_bits']}-bit"  # kv_bits 16: the unquantized float32 cache
            print(f"{a.shape} L={a.layers} prompt {a.prompt} (last {r['tokens_through_the_model']} through the model) "
                  f"step {step} {width:>7}: cache "
                  f"{r['cache_bytes'] / 2**20:8.1f} MiB, prefill peak above weights "
                  f"{r['prefill_peak_above_weights_bytes'] / 2**20:8.1f} MiB, decode peak "
                  f"{r['decode_peak_above_weights_bytes'] / 2**20:8.1f} MiB, prefill {r['prefill_seconds']:.1f} s",
                  flush=True)
    f32 = {r["prefill_step_size"]: r["cache_bytes"] for r in rows if r["kv_bits"] == 16}
    for r in rows:
        if r["prefill_step_size"] in f32:
            r["cache_ratio_to_float32_cache"] = r["cache_bytes"] / f32[r["prefill_step_size"]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "note": "float32 weights and K/V (kv_bits 16 rows are the float32 cache); peaks are MLX's, above the weights"}, f, indent=1)


# --- speed ---------------------------------------------------------------------------------------


def prefilled(pair, ids):
    """A float prompt cache holding `ids` (reused by every repeat of a setting: only decoding is timed)."""
    from mlx_gemma_mtp.runtime.pair import Pair, PromptCache
    from mlx_gemma_mtp.runtime.engine import Engine, Request
    from mlx_gemma_mtp.runtime.sampling import Sampling

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
    from mlx_gemma_mtp.runtime.pair import PromptCache
    from mlx_gemma_mtp.runtime.quantized_cache import quantize_cache

    return PromptCache(quantize_cache(holder.cache, q), list(holder.tokens))


def decode(pair, ids, holder, k, q, tokens, filt):
    """Decode `tokens` after the cached prompt with `pair` (a target-only Pair for K=0); returns
    (tok/s from first token to last, tokens)."""
    from mlx_gemma_mtp.runtime.engine import Engine, Request
    from mlx_gemma_mtp.runtime.sampling import Sampling

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


def run_speed(a) -> None:
    import numpy as np

    from mlx_gemma_mtp.bench.run import InjectedAcceptance
    from mlx_gemma_mtp.runtime.pair import Pair
    from mlx_gemma_mtp.runtime.quantized_cache import KVQuant
    from mlx_gemma_mtp.bench.shapes import random_pair

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
        args = {key: value for key, value in vars(a).items() if key not in ("command", "run")}
        with open(a.json, "w") as f:
            json.dump({"args": args, "rows": rows, "note": "random e2b-shaped float32 pair, injected acceptance, "
                       "2-core CPU shared with other work; quantized caches are the float prefill's cache quantized; "
                       "ratios are medians of per-repeat ratios (settings interleaved within each repeat)"}, f, indent=1)


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="The quantized KV cache: fidelity, long-run memory, prefill memory, "
                                             "decode speed (one subcommand each; see the module docstring).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fidelity", help="logit drift on a fixture target; demo-pair acceptance, float vs 8/4-bit")
    p.add_argument("--positions", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json")
    p.set_defaults(run=run_fidelity)

    p = sub.add_parser("long-run", help="memory of one long generation on the demo pair")
    p.add_argument("--kv-bits", type=int, default=8, help="4 or 8; 0 for the float cache")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=10000)
    p.add_argument("--k", default="4")
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--minutes", type=float, default=12.0, help="stop (and report) after this long")
    p.add_argument("--eager", action="store_true",
                   help="no mx.compile for the draft step and verification (to see what compiled traces add to RSS)")
    p.add_argument("--json", type=Path)
    p.add_argument("--txt", type=Path)
    p.add_argument("--plot", type=Path, help="needs matplotlib")
    p.set_defaults(run=run_long_run)

    p = sub.add_parser("memory", help="prefill and decode memory of a long prompt; --cache-only: cache bytes")
    p.add_argument("--shape", default="e2b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--steps", default="256,1024")
    p.add_argument("--bits", default="16,8,4")
    p.add_argument("--decode", type=int, default=4)
    p.add_argument("--tail", type=int, default=0,
                   help="run only the prompt's last TAIL tokens through the model: the context before them is "
                        "written into the cache directly and reused as a prompt cache (a 32K context's last "
                        "chunks, without the hours of prefilling the rest on a CPU)")
    p.add_argument("--json")
    p.add_argument("--cache-only", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.set_defaults(run=run_memory)

    p = sub.add_parser("speed", help="decode speed with each cache, plain and MTP, at a long context")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="repeats run first and not counted")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--inject", default="0.8,0.7,0.6,0.5")
    p.add_argument("--json")
    p.set_defaults(run=run_speed)
    return ap


def main():
    a = build_parser().parse_args()
    a.run(a)


if __name__ == "__main__":
    main()
