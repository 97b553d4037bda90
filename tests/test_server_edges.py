"""`gemma-mtp serve`'s life cycle on the demo pair, in a subprocess: /health says "loading" until the
engine has warmed up, a port in use fails at once, a full queue says when to come back (and the
official client's retries then get through), and SIGTERM ends every reply properly.

One server runs for the module, with a tiny batch and queue; the SIGTERM test stops it, so it
comes last.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from server_process import health, server_process  # noqa: E402

MODEL = "gemma-mtp-demo"
GRACE = 6  # --shutdown-grace
MAX_BATCH, MAX_QUEUE = 3, 1
PROMPT = "def parse_args(argv):"


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    log = tmp_path_factory.mktemp("edge-server") / "server.log"
    seen = []
    args = ["--demo", "--num-draft-tokens", "3", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
            "--shutdown-grace", str(GRACE), "--log-level", "warning"]
    started = time.monotonic()
    with server_process(args, log, seen=seen) as (port, proc):
        proc.port, proc.log, proc.seen, proc.start_seconds = port, log, seen, time.monotonic() - started
        yield proc


def post(port, path, body, timeout=60):
    """(status, headers (lower-case names), parsed JSON) of a POST that is not streamed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        conn.close()


class Stream:
    """A streamed completion read in a thread: its data lines as they come."""

    def __init__(self, port, max_tokens):
        self.events, self.status = [], None
        self.started = threading.Event()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                          body=json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                                           "temperature": 0, "stream": True}).encode())
        self.sock = self.conn.sock  # (the response takes it over from the connection)
        self.thread = threading.Thread(target=self.read)
        self.thread.start()

    def read(self):
        try:
            response = self.conn.getresponse()
            self.status = response.status
            for line in response:
                if line.startswith(b"data: "):
                    self.events.append(line[len(b"data: "):].strip().decode())
                    self.started.set()
        except (OSError, http.client.HTTPException):  # closed by `close`
            pass
        finally:
            self.started.set()
            self.conn.close()

    @property
    def done(self):
        return self.events[-1:] == ["[DONE]"]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the client goes away: the row leaves the batch
        except OSError:  # the reply had ended
            pass
        self.thread.join(timeout=30)


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_health_says_loading_until_warm(edge):
    """The HTTP server answers while the pair loads and warms up: 503 "loading", then 200 "ok"."""
    assert (503, "loading") in edge.seen and edge.seen[-1] == (200, "ok"), (edge.seen, edge.log.read_text())
    warm = health(edge.port)["warm_up_seconds"]
    print(f"first start: {edge.start_seconds:.1f} s to /health 200, warm-up {warm:.2f} s")
    assert warm > 0
    wait_for(lambda: "warmed up in" in edge.log.read_text(), timeout=10)  # the line that says it serves


def test_a_port_in_use_fails_at_once(edge):
    run = subprocess.run([sys.executable, "-m", "mlx_gemma_mtp.cli", "serve", "--demo", "--port", str(edge.port)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:") and "in use" in lines[0], \
        run.stderr
    assert "serving" not in run.stdout + run.stderr


def test_a_full_queue_says_when_to_come_back(edge):
    streams = [Stream(edge.port, 3000) for _ in range(MAX_BATCH)]
    try:
        for s in streams:
            assert s.started.wait(30) and s.status == 200
        queued = Stream(edge.port, 4)  # waits for a place in the batch
        wait_for(lambda: health(edge.port)["waiting"] == 1)
        status, headers, reply = post(edge.port, "/v1/completions",
                                      {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
        assert float(headers["retry-after-ms"]) > 0
    finally:
        for s in streams:
            s.close()
    queued.thread.join(timeout=30)
    assert queued.events[-1] == "[DONE]"
    wait_for(lambda: health(edge.port)["running"] == 0)


def test_a_flood_gets_through_with_the_clients_retries(edge):
    """12 clients at once against 3 rows and a queue of 1: the official client (2 retries by
    default) follows Retry-After and every request succeeds."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{edge.port}/v1", api_key="x", timeout=120)

    def one(_):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(MAX_BATCH) as pool:  # the recent time per token: a full batch's
        list(pool.map(one, range(MAX_BATCH)))
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(one, range(12)))
    assert len({r.choices[0].text for r in replies}) == 1 and all(r.usage.completion_tokens == 40 for r in replies)
    assert time.monotonic() - start < 90


def test_sigterm_ends_every_reply(edge):
    """SIGTERM: the queued request gets 503 at once, a row that finishes within the grace finishes,
    and what still runs after it ends with an error: an error event and [DONE] in a stream, a 503
    body otherwise. Then the process exits. (Last: it stops the module's server.)"""
    whole = concurrent.futures.ThreadPoolExecutor(2)
    long_stream = Stream(edge.port, 3000)
    long_whole = whole.submit(post, edge.port, "/v1/completions",
                              {"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "temperature": 0})
    wait_for(lambda: health(edge.port)["running"] == 2)
    short_stream = Stream(edge.port, 120)  # about a second of decoding: it finishes within the grace
    assert long_stream.started.wait(30) and short_stream.started.wait(30)
    queued = whole.submit(post, edge.port, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
    wait_for(lambda: health(edge.port)["waiting"] == 1)
    assert not short_stream.done
    os.kill(edge.pid, signal.SIGTERM)
    sent = time.monotonic()

    status, _, reply = queued.result(timeout=30)
    assert status == 503 and reply["error"]["code"] == "server_shutting_down"
    assert time.monotonic() - sent < GRACE  # at once, not after the grace
    with pytest.raises(OSError):  # no new connections
        post(edge.port, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}, timeout=5)

    short_stream.thread.join(timeout=30)
    assert short_stream.events[-1] == "[DONE]"
    assert json.loads(short_stream.events[-2])["choices"][0]["finish_reason"] == "length"

    long_stream.thread.join(timeout=GRACE + 30)
    assert long_stream.events[-1] == "[DONE]"
    error = json.loads(long_stream.events[-2])["error"]
    assert error["code"] == "server_shutting_down" and set(error) == {"message", "type", "param", "code"}
    assert time.monotonic() - sent >= GRACE - 0.5  # it had its grace

    status, _, reply = long_whole.result(timeout=30)
    assert status == 503 and reply["error"]["code"] == "server_shutting_down"
    whole.shutdown()
    edge.wait(timeout=30)
    assert "Traceback" not in edge.log.read_text()
