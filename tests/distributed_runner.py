"""One rank of tests/test_distributed.py and tests/test_distributed_serve.py, started by
`mlx.launch` (or alone, as the single process).

    python tests/distributed_runner.py OUT PAIR_DIR SHORT LONG [PAIR_DIR SHORT LONG ...]

For each pair folder: loads it; with SHORT > 0 decodes one prompt greedily for each draft setting
and once sampled with a seed, SHORT tokens each; with LONG > 0 decodes LONG tokens plainly and
then greedily with adaptive K, the drafts made right often by an injected filter so that K moves
from round to round (the fixture drafters are random: alone they keep K at 0). Writes this rank's
tokens, its adaptive K per round and its resident weight bytes as JSON to OUT/rank<r>.json, keyed
by folder (one launch for several pairs: starting and connecting the processes costs more than
decoding on a small machine).

    python tests/distributed_runner.py --cli ARGS...

runs `gemma-mtp ARGS` in this process.

Test hooks, read here only (the package has none), act on rank 1:
- MTP_TEST_SKEWED_CLOCK=1: its time.perf_counter runs 3x fast with up to 300 ms of jitter, so the
  round times it measures itself say nothing like rank 0's.
- MTP_TEST_FAIL_AT=N: its engine raises at its N-th step.
"""

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp import load, stream_generate
from mlx_gemma_mtp.bench.run import InjectedAcceptance
from mlx_gemma_mtp.model.sharding import weight_bytes

PROMPT = [2, 17, 300, 45, 9, 211, 77, 5, 190, 33, 61, 128]
GREEDY_SETTINGS = (0, 3, "adaptive")
SAMPLED = dict(num_draft_tokens=3, temperature=0.8, top_p=0.95, seed=7)
INJECTED = [0.8]  # conditional acceptance of every draft position in the long adaptive run


def install_hooks() -> None:
    if os.environ.get("MLX_RANK") != "1":
        return
    if os.environ.get("MTP_TEST_SKEWED_CLOCK") == "1":
        real, jitter = time.perf_counter, random.Random(1)
        time.perf_counter = lambda: 3 * real() + 0.3 * jitter.random()
    fail_at = int(os.environ.get("MTP_TEST_FAIL_AT", "0"))
    if fail_at:
        from mlx_gemma_mtp.runtime import engine

        step, steps = engine.Engine.step, itertools.count(1)

        def failing(self):
            if next(steps) >= fail_at:
                raise RuntimeError(f"rank 1 fails at its step {fail_at} (MTP_TEST_FAIL_AT)")
            return step(self)

        engine.Engine.step = failing


def tokens(pair, tokenizer, max_tokens, **kwargs):
    return [r.token for r in stream_generate(pair, tokenizer, PROMPT, max_tokens=max_tokens, **kwargs)]


def run(pair_dir: str, short: int, long: int) -> dict:
    pair, tokenizer = load(pair_dir)
    mx.eval(pair.target.parameters())
    out = {
        "rank": 0 if pair.group is None else pair.group.rank(),
        "size": 1 if pair.group is None else pair.group.size(),
        "target_bytes": weight_bytes(pair.target),
        "drafter_bytes": weight_bytes(pair.drafter),
        "active_bytes_after_load": mx.get_active_memory(),
    }
    if short:
        out["greedy"] = {str(k): tokens(pair, tokenizer, short, num_draft_tokens=k) for k in GREEDY_SETTINGS}
        out["sampled"] = tokens(pair, tokenizer, short, **SAMPLED)
    if long:
        plain = tokens(pair, tokenizer, long, num_draft_tokens=0)
        right = InjectedAcceptance(plain, len(PROMPT), INJECTED, pair.view.args.vocab_size, seed=3)
        pair.adaptive.clear()  # a fresh controller: its K from the first round on
        adaptive = tokens(pair, tokenizer, long, num_draft_tokens="adaptive", draft_filter=right)
        out["long"] = {"plain": plain, "adaptive": adaptive, "k": list(pair.adaptive.controller(1).history)}
    return out


def main(argv: list) -> None:
    install_hooks()
    if argv[0] == "--cli":
        from mlx_gemma_mtp.cli import main as cli

        cli(argv[1:], prog_name="gemma-mtp")
        return
    out_dir, jobs = Path(argv[0]), argv[1:]
    results = {p: run(p, int(short), int(long)) for p, short, long in zip(jobs[::3], jobs[1::3], jobs[2::3])}
    rank = next(iter(results.values()))["rank"]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
