"""Why greedy MTP can differ from plain decoding on MLX's CUDA backend, even in float32.

Prints the float32 matmul error of one row and of eight rows against float64 (cuBLAS runs
multi-row float32 products in TF32), then, on random float32 targets, how far the logits of
the last three prompt tokens move between one prompt pass, a 3-token verification-like pass
and three one-token steps, next to the gap between each position's top two logits: where the
gap is smaller than the movement, a greedy choice can flip.

    python benchmarks/gpu_numerics_probe.py    (results: benchmarks/results/h100_tf32_diagnosis.txt)
"""

import mlx.core as mx
import numpy as np

from mlx_gemma_mtp.shapes import random_pair
from mlx_gemma_mtp.cache import reserve


def matmul_errors():
    a = np.random.default_rng(0).standard_normal((8, 4096)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((4096, 4096)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    for rows in (1, 8):
        out = np.array(mx.array(a[:rows]) @ mx.array(b))
        error = np.abs(out - exact[:rows]).max() / np.abs(exact[:rows]).max()
        print(f"float32 matmul M={rows}: max relative error {error:.2e}")


def logit_drift(shape: str, layers: int, vocab: int = 262144):
    view = random_pair(shape, layers, vocab).view
    prompt = mx.array([2] + list(range(100, 131)), mx.uint32)
    n = prompt.size

    def fresh(prefix):
        cache = view.make_cache()
        reserve(cache, n)
        view.hidden(prompt[None, :prefix], cache)
        return cache

    whole = view.make_cache()
    reserve(whole, n)
    one_pass = view.logits(view.hidden(prompt[None], whole))[0, -3:]
    three = view.logits(view.hidden(prompt[None, -3:], fresh(n - 3)))[0]
    cache = fresh(n - 3)
    steps = mx.concatenate([view.logits(view.hidden(prompt[None, i : i + 1], cache))[0] for i in range(n - 3, n)])
    top2 = mx.sort(one_pass, axis=-1)[:, -2:]
    print(f"{shape}, {layers} layers: top-2 logit gaps {[round(g, 3) for g in (top2[:, 1] - top2[:, 0]).tolist()]}; "
          f"max |one pass - 3-token pass| {mx.abs(one_pass - three).max().item():.3f}; "
          f"max |3-token pass - one-token steps| {mx.abs(three - steps).max().item():.3f}")


if __name__ == "__main__":
    print(f"device: {mx.default_device()}")
    matmul_errors()
    logit_drift("e2b", 35)
    logit_drift("31b", 8)
