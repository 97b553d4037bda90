"""Plain decoding: our engine (num_draft_tokens=0) against mlx_lm.stream_generate, same model.

A random float32 Gemma 4 text model with E2B's per-layer shapes (fewer layers, smaller vocabulary
so it fits a small machine; `gemma-mtp bench --shape e2b` builds the same), runs interleaved in one process; decode speed is timed the same way
for both, from the first generated token to the last. On Linux, preload OpenBLAS (see
shared/design/measuring.md): LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0

    python benchmarks/plain_decode.py --layers 6 --vocab 32768 --tokens 64 --repeats 5
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate as mlx_lm_stream_generate

from mlx_gemma_mtp import Pair, stream_generate
from mlx_gemma_mtp.bench.shapes import random_pair, word_tokenizer


def decode_rate(responses) -> tuple[float, list]:
    """Tokens per second from the first response to the last, and the tokens."""
    tokens, first = [], None
    for r in responses:
        if first is None:
            first = time.perf_counter()
        tokens.append(r.token)
    return (len(tokens) - 1) / (time.perf_counter() - first), tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    model = random_pair("e2b", args.layers, args.vocab).target
    tokenizer = word_tokenizer(args.vocab)
    tokenizer.eos_token_ids = []  # decode the full length in both
    prompt = [2] + list(range(10, 10 + args.prompt_tokens - 1))
    pair = Pair(model)

    def ours():
        return decode_rate(stream_generate(pair, tokenizer, prompt, max_tokens=args.tokens, num_draft_tokens=0))

    def theirs():
        return decode_rate(mlx_lm_stream_generate(model, tokenizer, mx.array(prompt), max_tokens=args.tokens))

    ours(), theirs()  # warm up
    rates = {"ours": [], "mlx_lm": []}
    for _ in range(args.repeats):
        rate, ours_tokens = ours()
        rates["ours"].append(rate)
        rate, mlx_lm_tokens = theirs()
        rates["mlx_lm"].append(rate)
        assert ours_tokens == mlx_lm_tokens, "the two decoders disagree"
    result = {
        "model": f"random float32 gemma4_text, E2B shapes, {args.layers} layers, vocab {args.vocab}",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "plain_tokens_per_second": statistics.median(rates["ours"]),
        "mlx_lm_tokens_per_second": statistics.median(rates["mlx_lm"]),
        "all_rates": rates,
    }
    result["ratio"] = result["plain_tokens_per_second"] / result["mlx_lm_tokens_per_second"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
