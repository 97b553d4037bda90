"""One rank of tests/test_distributed.py, started by `mlx.launch` (or alone, as the single process).

For each pair folder: loads it, decodes one prompt greedily for each draft setting and once
sampled with a seed, and records this rank's tokens and resident weight bytes; writes them as JSON
to OUT/rank<r>.json, keyed by folder (one launch for several pairs: starting and connecting the
processes costs more than decoding on a small machine).

    python tests/distributed_runner.py OUT MAX_TOKENS PAIR_DIR...
"""

import json
import sys
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp import load, stream_generate
from mlx_gemma_mtp.sharding import weight_bytes

PROMPT = [2, 17, 300, 45, 9, 211, 77, 5, 190, 33, 61, 128]
GREEDY_SETTINGS = (0, 3, "adaptive")
SAMPLED = dict(num_draft_tokens=3, temperature=0.8, top_p=0.95, seed=7)


def tokens(pair, tokenizer, max_tokens, **kwargs):
    return [r.token for r in stream_generate(pair, tokenizer, PROMPT, max_tokens=max_tokens, **kwargs)]


def run(pair_dir: str, max_tokens: int) -> dict:
    pair, tokenizer = load(pair_dir)
    mx.eval(pair.target.parameters())
    out = {
        "rank": 0 if pair.group is None else pair.group.rank(),
        "size": 1 if pair.group is None else pair.group.size(),
        "target_bytes": weight_bytes(pair.target),
        "drafter_bytes": weight_bytes(pair.drafter),
        "active_bytes_after_load": mx.get_active_memory(),
        "greedy": {str(k): tokens(pair, tokenizer, max_tokens, num_draft_tokens=k) for k in GREEDY_SETTINGS},
        "sampled": tokens(pair, tokenizer, max_tokens, **SAMPLED),
    }
    adaptive = pair.adaptive.get(1)
    out["adaptive_k"] = list(getattr(adaptive, "history", []))
    return out


if __name__ == "__main__":
    out_dir, max_tokens, pairs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    results = {p: run(p, max_tokens) for p in pairs}
    rank = results[pairs[0]]["rank"]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
