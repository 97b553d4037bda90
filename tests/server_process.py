"""`gemma-mtp serve` in a subprocess on 127.0.0.1 and a free port, for the server tests."""

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def wait_healthy(proc: subprocess.Popen, port: int, log, timeout: float) -> None:
    """Return once /health answers 200; fail the test with the log if PROC exits or TIMEOUT passes."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            health(port)
            return
        except OSError:  # not listening yet, or 503 while the engine is not running
            pass
        if time.time() > deadline:
            pytest.fail(f"the server did not come up:\n{log.read_text()}")
        time.sleep(0.3)


@contextlib.contextmanager
def running_server(args: list, log, timeout: float = 180):
    """Start `gemma-mtp serve ARGS --port P`, yield P once /health answers; always stop it."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma_mtp.cli", "serve", *args, "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log, timeout)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    assert proc.returncode is not None
