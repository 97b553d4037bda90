"""Does mx.compile speed up the drafter, and by how much at most?

Times one K-step draft block (the drafter's K sequential steps, greedy) on a prefilled random
pair, eager and through mx.compile of the whole block, on a fixed context so the compiled
function is traced once; plus the target's plain step and K+1-token verification for scale.
The compiled time is an upper bound on what compiling the draft block can give in the loop.

    python benchmarks/compile_probe.py --shape 31b --layers 8 --dtype float32
"""

import argparse

import mlx.core as mx

from mlx_gemma_mtp.bench import device_description, median_time, random_pair
from mlx_gemma_mtp.decode import CACHE_SLACK, prefill


def median_ms(fn, repeats):
    return 1000 * median_time(fn, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="31b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--ks", default="1,4")
    ap.add_argument("--repeats", type=int, default=20)
    opts = ap.parse_args()

    pair = random_pair(opts.shape, opts.layers, opts.vocab, dtype=getattr(mx, opts.dtype))
    view, drafter = pair.view, pair.drafter
    cache = view.make_cache(CACHE_SLACK)
    context = mx.random.randint(10, opts.vocab, (opts.context,)).astype(mx.uint32)
    hidden = prefill(view, context[:-1], cache)
    token = context[-1:].astype(mx.int32)[None]
    mx.eval(hidden, [c.state for c in cache])
    window = drafter.args.sliding_window + 1
    kv = view.shared_kv(cache, window)
    position = cache[view.producers["full_attention"]].offset
    masks = {kind: None for kind in kv}  # one query: the cut K/V is exactly what it sees

    def block(k, token, hidden, full_k, full_v, slide_k, slide_v, position):
        kv = {"full_attention": (full_k, full_v), "sliding_attention": (slide_k, slide_v)}
        drafts = []
        for _ in range(k):
            h, hidden = drafter.step(view.embed(token), hidden, kv, masks, position)
            token = drafter.greedy_token(h)
            drafts.append(token)
        return mx.concatenate(drafts, axis=1)

    args = (token, hidden, *kv["full_attention"], *kv["sliding_attention"])
    pos = mx.array(position, mx.int32)

    def verify(n):
        out = mx.argmax(view.logits(view.hidden(mx.concatenate([token] * n, axis=1), cache)), axis=-1)
        mx.eval(out)
        for c in cache:
            c.trim(n)

    print(f"device: {device_description()}; {opts.shape} shapes, {opts.layers} layers, vocab {opts.vocab}, "
          f"{opts.dtype}, context {opts.context}")
    print(f"plain step (1 token): {median_ms(lambda: verify(1), opts.repeats):.2f} ms")
    for k in [int(v) for v in opts.ks.split(",")]:
        eager = median_ms(lambda: mx.eval(block(k, *args, position)), opts.repeats)
        eager_arr = median_ms(lambda: mx.eval(block(k, *args, pos)), opts.repeats)
        compiled_fn = mx.compile(lambda *a: block(k, *a))
        compiled = median_ms(lambda: mx.eval(compiled_fn(*args, pos)), opts.repeats)
        same = mx.array_equal(compiled_fn(*args, pos), block(k, *args, position)).item()
        verify_ms = median_ms(lambda: verify(k + 1), opts.repeats)
        print(f"K={k}: verify {k + 1} tokens {verify_ms:.2f} ms; draft block eager {eager:.2f} ms "
              f"(array position {eager_arr:.2f}), compiled {compiled:.2f} ms ({eager / compiled:.2f}x), "
              f"same drafts: {same}")


if __name__ == "__main__":
    main()
