"""Memory of a long prompt with a float, 8-bit and 4-bit KV cache, and the prefill's peak for two
prefill step sizes: a random target with E2B's or 31B's per-layer shapes (fewer layers, smaller
vocabulary), prefilled through the engine (float32 weights and K/V: MLX's CPU float16 matmuls are
far slower; the float rows, kv_bits 16 in the JSON, are the float32 cache), then a few decode rounds. `--cache-only` measures the cache bytes of a long context
in float16 without a model: every full and sliding layer's K/V of that shape written into the
float16 and quantized caches (the arrays as allocated).

Each setting runs in its own process (a clean allocator and peak). On Linux preload OpenBLAS:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0

    python benchmarks/quantized_kv_memory.py --shape e2b --layers 4 --prompt 16384 --steps 256,1024 \
        --json benchmarks/results/quantized_kv_memory_e2b.json
"""

import argparse
import json
import os
import subprocess
import sys
import time


def write_context(cache, args, tokens: int, dtype) -> None:
    """Write `tokens` entries of random K/V into every cache layer, in the shapes and format the
    target writes (the memory of a long context without computing it)."""
    import mlx.core as mx

    from mlx_gemma_mtp.cache import reserve

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

    from mlx_gemma_mtp.cache import cache_bytes
    from mlx_gemma_mtp.decode import PromptCache
    from mlx_gemma_mtp.engine import Engine, Request
    from mlx_gemma_mtp.quantized_cache import KVQuant
    from mlx_gemma_mtp.sampling import Sampling
    from mlx_gemma_mtp.shapes import random_pair

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

    from mlx_gemma_mtp.cache import cache_bytes, make_target_cache
    from mlx_gemma_mtp.quantized_cache import KVQuant, make_quantized_cache
    from mlx_gemma_mtp.shapes import SHAPES, target_args

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


def main():
    p = argparse.ArgumentParser()
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
    a = p.parse_args()
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
            out = subprocess.run([sys.executable, __file__, "--shape", a.shape, "--layers", str(a.layers),
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


if __name__ == "__main__":
    main()
