"""`gemma-mtp serve` in a subprocess on 127.0.0.1 and a free port, for the server tests."""

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def wait_healthy(proc: subprocess.Popen, port: int, log, timeout: float, seen: Optional[list] = None) -> None:
    """Return once /health answers 200; fail the test with the log if PROC exits or TIMEOUT passes.
    `seen` gets each (HTTP status, "status") /health answered on the way."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            body = health(port)
            if seen is not None:
                seen.append((200, body["status"]))
            return
        except urllib.error.HTTPError as e:  # 503 while the engine loads and warms up
            if seen is not None:
                seen.append((e.code, json.loads(e.read())["status"]))
        except OSError:  # not listening yet
            pass
        if time.time() > deadline:
            pytest.fail(f"the server did not come up:\n{log.read_text()}")
        time.sleep(0.3 if seen is None else 0.1)


@contextlib.contextmanager
def running_server(args: list, log, timeout: float = 180):
    """Start `gemma-mtp serve ARGS --port P`, yield P once /health answers; always stop it."""
    with server_process(args, log, timeout) as (port, _):
        yield port


@contextlib.contextmanager
def server_process(args: list, log, timeout: float = 180, seen: Optional[list] = None):
    """`running_server` that yields (port, the process), for a test that signals it; `seen`: as
    in `wait_healthy`."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma_mtp.cli", "serve", *args, "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, port, log, timeout, seen)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    assert proc.returncode is not None
