"""The target split over 2 processes (mlx.launch, ring backend over 127.0.0.1) against the single
process: the same greedy tokens (K = 0, 3, adaptive; past the sliding window), the same seeded
sampled tokens, and each rank holding about half of the target and the whole drafter."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import distributed_runner

RUNNER = Path(__file__).with_name("distributed_runner.py")
MAX_TOKENS = 32  # prompt 12 + 32 tokens: past every fixture's sliding window (16, 24)
LAUNCH_TIMEOUT = 240


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


def launch(pairs: list, out: Path) -> list:
    """Each rank's results for the pair folders; the launcher and its ranks are killed when done
    or after the timeout."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port",
           str(free_ports()), "--", sys.executable, str(RUNNER), str(out), str(MAX_TOKENS), *map(str, pairs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the ranks run in the launcher's session
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, log.decode(errors="replace")[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


VARIANTS = ("e2b", "26b", "31b")


@pytest.fixture(scope="module")
def two_ranks(pair_dir, tmp_path_factory):
    """One launch for every variant: variant -> [rank 0's result, rank 1's]."""
    pairs = {v: pair_dir(v) for v in VARIANTS}
    ranks = launch(list(pairs.values()), tmp_path_factory.mktemp("ranks"))
    return {v: [r[str(p)] for r in ranks] for v, p in pairs.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_match_one_process(variant, pair_dir, two_ranks):
    ranks = two_ranks[variant]
    single = distributed_runner.run(str(pair_dir(variant)), MAX_TOKENS)
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
