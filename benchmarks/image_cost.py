"""What an image costs before decoding starts: preparing its pixels, and encoding them.

Preparing (decode is not included: the image is a PIL image already) is timed on a 1920x1080
screenshot-sized and a 4032x3024 photo-sized noise image at each budget, for the towers (Pillow's
bicubic) and the 12B (the fixed-point resize of `vision/resample.py`). Encoding is timed on
full-size encoders with random weights, the sizes of transformers' defaults: a 16-layer,
768-wide tower projecting to a 1536-wide text model (E2B's), and the 12B's encoder-free embedder
projecting to 3840. The first call of each shape is a warm-up; the best of --repeats is kept.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/image_cost.py \
        --out benchmarks/results/image_cost_cpu.json     # on Linux: see docs/benchmarks.md
"""

import argparse
import json
import os
import platform
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image

from mlx_gemma_mtp.vision.encoder import TowerEmbedder, VisionArgs
from mlx_gemma_mtp.vision.processor import SOFT_TOKEN_BUDGETS, PatchGeometry, prepare
from mlx_gemma_mtp.vision.unified import UnifiedArgs, UnifiedEmbedder

SIZES = {"1920x1080": (1920, 1080), "4032x3024": (4032, 3024)}
GEOMETRIES = {"tower": PatchGeometry(16, 3), "12b": PatchGeometry(16, 3, merged=True)}


def noise(width, height):
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (height, width, 3), dtype=np.uint8))


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def randomize(module, seed=0):
    """Small random weights (the default init of some parameters is zeros or ones)."""
    rs = np.random.RandomState(seed)
    params = tree_flatten(module.parameters())
    module.update(tree_unflatten(
        [(k, mx.array(rs.normal(0, 0.02, v.shape).astype(np.float32)).astype(v.dtype)) for k, v in params]))
    mx.eval(module.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="70,280,1120", help="soft-token budgets to time")
    ap.add_argument("--encode-budgets", default="70,280", help="budgets to encode (1120 is slow on a CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    assert all(b in SOFT_TOKEN_BUDGETS for b in budgets)

    prepare_rows = []
    for size_name, (w, h) in SIZES.items():
        img = noise(w, h)
        for geo_name, geometry in GEOMETRIES.items():
            for budget in budgets:
                prepared = prepare(img, budget, geometry)
                seconds = best_of(args.repeats, lambda: prepare(img, budget, geometry))
                prepare_rows.append({"image": size_name, "model": geo_name, "budget": budget,
                                     "soft_tokens": prepared.num_soft_tokens,
                                     "resized": f"{prepared.width}x{prepared.height}", "seconds": round(seconds, 4)})
                print(prepare_rows[-1], flush=True)

    encoders = {"tower": TowerEmbedder(VisionArgs()), "12b": UnifiedEmbedder(UnifiedArgs(text_hidden_size=3840))}
    encode_rows = []
    img = noise(*SIZES["1920x1080"])
    for name, module in encoders.items():
        randomize(module)
        for budget in [int(b) for b in args.encode_budgets.split(",")]:
            prepared = prepare(img, budget, GEOMETRIES[name])

            def encode():
                mx.eval(module(mx.array(prepared.pixel_values), prepared.positions, prepared.grid))

            encode()  # warm-up
            seconds = best_of(args.repeats, encode)
            encode_rows.append({"encoder": name, "budget": budget, "soft_tokens": prepared.num_soft_tokens,
                                "patches": int(prepared.pixel_values.shape[0]), "dtype": "float32",
                                "seconds": round(seconds, 4)})
            print(encode_rows[-1], flush=True)

    result = {
        "question": "what an image costs before decoding: preparing its pixels, encoding them",
        "command": "python benchmarks/image_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "mlx_device": str(mx.default_device()), "mlx": mx.__version__,
                    "ld_preload": os.environ.get("LD_PRELOAD", "")},
        "prepare": prepare_rows,
        "encode": encode_rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
