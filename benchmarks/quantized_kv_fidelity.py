"""How far a quantized KV cache moves the target: (1) a miniature E2B-variant fixture target (tests/
reference_models.py, float32): its logits at 1,000 positions of one prompt with an 8-bit and a 4-bit
cache (group 32, its head dim is 32) against the float cache, max |difference| and top-1 agreement;
(2) the demo pair: acceptance per position at K=4, greedy, on held-out prompts, float vs 8/4-bit.

    python benchmarks/quantized_kv_fidelity.py --json benchmarks/results/quantized_kv_fidelity.json
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

DEMO_PROMPTS = ["def parse_args(argv):", "import os\n\n\ndef walk(top):", "class Queue:\n    def __init__(self):",
                "def read_lines(path):\n    with open(path) as f:", "import json\n\n\ndef load(path):",
                "def fib(n):", "class Point:\n    def __init__(self, x, y):", "def merge(a, b):"]


def fixture_logits(positions: int) -> list:
    import reference_models as ref
    from mlx_gemma_mtp import load
    from mlx_gemma_mtp.convert import convert
    from mlx_gemma_mtp.quantized_cache import KVQuant

    root = Path(tempfile.mkdtemp())
    target, draft = ref.build_pair("e2b", root)
    convert(str(target), root / "pair", draft=str(draft), dtype="float32", progress=False)
    pair, _ = load(str(root / "pair"))
    view = pair.view
    ids = mx.array([[2] + np.random.default_rng(0).integers(110, 512, size=positions - 1).tolist()], mx.uint32)

    def logits(q):
        cache, out = view.make_cache(1, q), []
        for at in range(0, positions, 100):
            from mlx_gemma_mtp.cache import reserve
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
    from mlx_gemma_mtp.demo import load_demo

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--positions", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json")
    a = p.parse_args()
    out = {"fixture_e2b_logits": fixture_logits(a.positions), "demo_acceptance_k4": demo_acceptance(a.tokens)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
