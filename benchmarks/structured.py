"""Structured output with MTP: constrained MTP against constrained plain decoding, and the mask cost.

On the demo pair (its own drafter) and on the demo pair with injected acceptance (a draft_filter
that makes draft j right with the probabilities of PROFILE, against the constrained greedy
output), greedy, one row: tokens per second of plain (K = 0) and MTP (K = 3) decoding, without
and with a JSON Schema, and MTP with forced-token replacement turned off. The mask cost is the
host time of one llguidance mask per token (demo vocabulary: 4096 tokens).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/structured.py \
        --out benchmarks/results/structured_demo.json     # on Linux: see docs/benchmarks.md
"""

import argparse
import json
import os
import platform
import time

import numpy as np

from mlx_gemma_mtp import batch_generate
from mlx_gemma_mtp.runtime import structured
from mlx_gemma_mtp.bench.run import InjectedAcceptance
from mlx_gemma_mtp.model.demo import load_demo
from mlx_gemma_mtp.runtime.grammar import Constraint

SCHEMA = {"type": "array", "maxItems": 6, "minItems": 6, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "id", "tags"], "properties": {
        "name": {"type": "string", "maxLength": 10}, "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["alpha", "beta", "gamma"]}}}}}
PROMPT = "List six records as JSON:"
MAX_TOKENS = 160
PROFILE = [0.9, 0.8, 0.7]
REPEATS = 3


def timed(pair, tok, k, grammar=None, draft_filter=None):
    best = None
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = batch_generate(pair, tok, [PROMPT], max_tokens=MAX_TOKENS, num_draft_tokens=k, grammar=grammar,
                             draft_filter=draft_filter)
        seconds = time.perf_counter() - start
        tokens = len(out.tokens[0])
        s = out.stats[0]
        row = {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 1),
               "tokens_per_round": round(tokens / max(1, s.rounds), 2), "text": out.texts[0][:80]}
        if best is None or row["seconds"] < best["seconds"]:
            best = row
    return best


def mask_cost(grammar, tok, vocab, tokens):
    c = grammar.constraint(tok, vocab, tok.eos_token_ids)
    out = np.zeros(c.words, np.int32)
    times = []
    for t in tokens:
        start = time.perf_counter()
        c.mask(out)
        times.append(time.perf_counter() - start)
        if t in c.eos_ids or not c.matcher.consume_token(t):
            break
    return {"tokens": len(times), "mean_us": round(1e6 * float(np.mean(times)), 1),
            "median_us": round(1e6 * float(np.median(times)), 1), "max_us": round(1e6 * float(np.max(times)), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/structured_demo.json")
    args = ap.parse_args()
    pair, tok = load_demo()
    vocab = pair.view.args.vocab_size
    grammar = structured.json_schema(SCHEMA, tok, vocab)
    timed(pair, tok, 3, grammar)  # warm-up (traces)
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    results = {"machine": f"{platform.machine()} {platform.system()}, MLX CPU (2 cores)"
                          + (", OpenBLAS preloaded" if preloaded else ", MLX's bundled reference BLAS"),
               "schema": SCHEMA, "max_tokens": MAX_TOKENS, "repeats (best of)": REPEATS, "demo": {}, "injected": {}}
    demo = results["demo"]
    demo["plain"] = timed(pair, tok, 0)
    demo["mtp"] = timed(pair, tok, 3)
    demo["plain_constrained"] = timed(pair, tok, 0, grammar)
    demo["mtp_constrained"] = timed(pair, tok, 3, grammar)
    original = Constraint.round_masks

    def no_replacement(self, drafts):
        self.replace_forced = False
        return original(self, drafts)

    Constraint.round_masks = no_replacement
    demo["mtp_constrained_no_forced_replacement"] = timed(pair, tok, 3, grammar)
    Constraint.round_masks = original
    # injected acceptance against the constrained greedy output
    ids = tok.encode(PROMPT)
    reference = batch_generate(pair, tok, [PROMPT], max_tokens=MAX_TOKENS + 8, num_draft_tokens=0, grammar=grammar)
    plain_ref = batch_generate(pair, tok, [PROMPT], max_tokens=MAX_TOKENS + 8, num_draft_tokens=0)
    inj = results["injected"]
    inj["profile"] = PROFILE
    inj["plain"] = timed(pair, tok, 0)
    inj["mtp"] = timed(pair, tok, 3, None, InjectedAcceptance(plain_ref.tokens[0], len(ids), PROFILE, vocab))
    inj["plain_constrained"] = timed(pair, tok, 0, grammar)
    inj["mtp_constrained"] = timed(pair, tok, 3, grammar, InjectedAcceptance(reference.tokens[0], len(ids), PROFILE,
                                                                              vocab))
    for part in (demo, inj):
        part["speedup_unconstrained"] = round(part["mtp"]["tokens_per_second"] / part["plain"]["tokens_per_second"], 2)
        part["speedup_constrained"] = round(part["mtp_constrained"]["tokens_per_second"]
                                            / part["plain_constrained"]["tokens_per_second"], 2)
    results["mask_cost"] = mask_cost(grammar, tok, vocab, reference.tokens[0])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "schema"}, indent=2))


if __name__ == "__main__":
    main()
