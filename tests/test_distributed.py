"""The target split over 2 processes (mlx.launch, ring backend over 127.0.0.1) against the single
process: the same greedy tokens (K = 0, 3, adaptive; past the sliding window), the same seeded
sampled tokens, and each rank holding about half of the target and the whole drafter. Over a long
run with adaptive K (drafts made right often, so K moves) the ranks choose the same K every round
and give the single process's tokens, with equal clocks and with rank 1's clock skewed. A rank that
fails under `gemma-mtp generate` stops the group, and rank 0 writes no text after it."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import distributed_runner

RUNNER = Path(__file__).with_name("distributed_runner.py")
MAX_TOKENS = 32  # prompt 12 + 32 tokens: past every fixture's sliding window (16, 24)
LONG_TOKENS = 160  # the adaptive policy's choices over many rounds (ranks diverged after ~16 tokens)
LAUNCH_TIMEOUT = 240

pytestmark = pytest.mark.usefixtures("launch_lock")  # one file of rings at a time


def free_ports(n: int = 2) -> int:
    """A first port of `n` consecutive free ones on 127.0.0.1 (mlx.launch uses port, port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            held = []
            for p in range(first, first + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports on 127.0.0.1")


def mlx_launch(args: list, env: dict = None, timeout: float = LAUNCH_TIMEOUT) -> tuple:
    """(stdout, stderr) of `mlx.launch -n 2 -- ARGS`; the launcher and its ranks are killed when
    done or after the timeout. mlx.launch exits 0 whatever its ranks do: it logs a rank that
    exited with an error and ends the others."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port",
           str(free_ports()), "--", sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the ranks run in the launcher's session
        except ProcessLookupError:
            pass
        proc.wait()
    return out.decode(errors="replace"), err.decode(errors="replace")


def launch(jobs: list, out: Path, env: dict = None) -> list:
    """Each rank's results for the jobs (pair folder, short tokens, long tokens)."""
    stdout, stderr = mlx_launch([RUNNER, out, *[x for job in jobs for x in job]], env)
    assert "exited with code" not in stderr and "was killed" not in stderr, (stdout + stderr)[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


VARIANTS = ("e2b", "26b", "31b")
LONG_VARIANT = "e2b"  # the long run with equal clocks (per-layer inputs: the most all-sums per round)
SKEWED_VARIANT = "26b"  # ... with rank 1's clock skewed (experts summed across ranks)


@pytest.fixture(scope="module")
def two_ranks(launch_lock, pair_dir, tmp_path_factory):
    """One launch for every variant: variant -> [rank 0's result, rank 1's]."""
    pairs = {v: pair_dir(v) for v in VARIANTS}
    jobs = [(p, MAX_TOKENS, LONG_TOKENS if v == LONG_VARIANT else 0) for v, p in pairs.items()]
    ranks = launch(jobs, tmp_path_factory.mktemp("ranks"))
    return {v: [r[str(p)] for r in ranks] for v, p in pairs.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_match_one_process(variant, pair_dir, two_ranks):
    ranks = two_ranks[variant]
    single = distributed_runner.run(str(pair_dir(variant)), MAX_TOKENS, 0)
    assert single["size"] == 1 and [r["size"] for r in ranks] == [2, 2]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["greedy"] == single["greedy"], f"rank {r['rank']}"
        assert r["sampled"] == single["sampled"], f"rank {r['rank']}"
        assert len(r["greedy"]["3"]) == MAX_TOKENS
        # about half of the target (the embedding, norms and the producer layers' K/V projections
        # stay whole on every rank), the whole drafter
        assert r["target_bytes"] < 0.6 * single["target_bytes"]
        assert r["drafter_bytes"] == single["drafter_bytes"]
    assert 2 * ranks[0]["target_bytes"] > single["target_bytes"]


def check_long_run(ranks: list, single: dict) -> None:
    """Every rank's long adaptive run gives the single process's greedy tokens, and the ranks chose
    the same K in every round (K itself moved: the run put the policy to work)."""
    want = single["long"]["plain"]
    assert len(want) == LONG_TOKENS and single["long"]["adaptive"] == want
    for r in ranks:
        assert r["long"]["plain"] == want, f"rank {r['rank']}"
        assert r["long"]["adaptive"] == want, f"rank {r['rank']}"
    ks = [r["long"]["k"] for r in ranks]
    assert ks[0] == ks[1]
    assert len(set(ks[0])) >= 3, ks[0]


def test_long_adaptive_run_with_equal_clocks(pair_dir, two_ranks):
    check_long_run(two_ranks[LONG_VARIANT], distributed_runner.run(str(pair_dir(LONG_VARIANT)), 0, LONG_TOKENS))


def test_long_adaptive_run_with_rank1s_clock_skewed(pair_dir, tmp_path):
    """Rank 1 times its rounds 3x fast with jitter: its K must still be rank 0's."""
    pair = pair_dir(SKEWED_VARIANT)
    ranks = launch([(pair, 0, LONG_TOKENS)], tmp_path, env={"MTP_TEST_SKEWED_CLOCK": "1"})
    check_long_run([r[str(pair)] for r in ranks], distributed_runner.run(str(pair), 0, LONG_TOKENS))


def test_a_failed_rank_stops_generate_and_rank0_writes_nothing_after_it(pair_dir, loaded):
    """Rank 1 raises at its 10th engine step of `gemma-mtp generate`: it exits with an error, the
    group stops (rank 0 loses its peer or is ended by the launcher, never exiting 0), and what rank 0
    wrote is the start of the single process's text, none of it after the failure (each round
    emits at most K + 1 = 4 tokens)."""
    fail_at, text = 10, "The quick brown fox"
    pair, tokenizer = loaded(SKEWED_VARIANT)
    ids = tokenizer.encode(text)

    def reply(max_tokens):
        from mlx_gemma_mtp import generate

        return generate(pair, tokenizer, ids, max_tokens=max_tokens, num_draft_tokens=3)

    args = ["generate", "--model", pair_dir(SKEWED_VARIANT), "--prompt", text, "--raw", "--max-tokens",
            LONG_TOKENS, "--num-draft-tokens", 3]
    stdout, stderr = mlx_launch([RUNNER, "--cli", *args], {"MTP_TEST_FAIL_AT": str(fail_at)})
    assert "rank 1 fails at its step 10" in stderr, stderr[-3000:]
    assert re.search(r"rank 1 exited with code [1-9]", stderr), stderr[-3000:]
    assert re.search(r"rank 0 (exited with code -?[1-9]|was killed)", stderr), stderr[-3000:]
    whole = reply(LONG_TOKENS)
    assert len(whole) > len(reply(4 * fail_at)) > 0
    assert stdout and whole.startswith(stdout) and len(stdout) <= len(reply(1 + 4 * fail_at)), stdout


def test_every_policy_on_a_rank_learns_rank0s_times_a_round_late():
    """On a rank (here a group of one) every adaptive policy the engine gets is an AgreedDraft, a
    new batch size's too; its controller learns a round (K, acceptance, rank 0's seconds) when the
    next round is observed, from the all-sum queued with the first."""
    import mlx.core as mx

    from mlx_gemma_mtp.model.sharding import AgreedDraft, agreed_policies

    policies = agreed_policies(mx.distributed.init())
    one, two = policies.for_batch(1), policies.for_batch(2)
    assert isinstance(one, AgreedDraft) and isinstance(two, AgreedDraft) and policies.for_batch(2) is two
    controller = policies.controller(1)
    one.observe(3, [2], 0.25)
    assert controller.rounds == 0 and controller.cost_line() is None
    one.observe(0, [0], None)
    assert controller.rounds == 1 and controller.reached[:4] == [1, 1, 1, 0] and controller.accepted[:3] == [1, 1, 0]
    assert abs(controller.cost(3) - 0.25) < 1e-9  # rank 0's seconds
    assert policies.controller(2).rounds == 0
