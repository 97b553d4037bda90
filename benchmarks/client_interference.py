"""What a streaming client alone takes from `stream_generate` on the same cores: a ceiling on any
server's concurrency-1 ratio (serve_bench.py's solo_ratios) on this machine.

A null server (another process, stdlib only: canned completion chunks of the real server's shape,
one per token at the decode's own rate, one write each, no model) streams to a client in a third
process that reads exactly as serve_bench's concurrency-1 client does (serve_bench.solo_request:
the openai client, or the bare http.client reader), request after request. Each `stream_generate`
run of a prompt with that pair running is divided by the mean of the runs alone just before and
after it; between "with" runs both processes are stopped (SIGSTOP), so no start-up work falls into
a run. A real server does all the null server's work and decodes too, so where the client alone
costs decoding more than 5%, no server reaches 0.95 of `stream_generate` through that client here.
With --split-cores (Linux, with OPENBLAS_NUM_THREADS=1) decoding runs on CPU 0 and the null server
and the client on CPU 1, as on a machine with a core to spare.

    python benchmarks/client_interference.py [--prompts 2] [--tokens 256] [--repeats 5] [--split-cores]
        [--modes openai_streamed,http_client_streamed] [--out benchmarks/results/client_interference_demo]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_bench  # noqa: E402  (its clients, build, timing and result helpers)


# --- the null server (child process) -------------------------------------------------------------


def null_server(port: int, tokens: int, gap: float) -> None:
    """Serve POST /v1/completions as a stream of `tokens` one-word chunks, `gap` seconds apart."""
    base = {"id": "cmpl-0123456789abcdef0123456789abcdef", "object": "text_completion", "created": 1764547200,
            "model": "bench"}

    def event(data) -> bytes:
        body = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        return b"%x\r\n%s\r\n" % (len(body), body)  # chunked transfer encoding, as uvicorn sends it

    word = event({**base, "choices": [{"index": 0, "text": " word", "logprobs": None, "finish_reason": None}],
                  "usage": None})
    end = (event({**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
                  "usage": None})
           + event({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens,
                                                     "total_tokens": tokens + 3}})
           + event("[DONE]") + b"0\r\n\r\n")

    def handle(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb")
        try:
            while True:  # requests on this connection (the openai client keeps it alive)
                length = None
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length is None:
                    return
                reader.read(length)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for _ in range(tokens):
                    time.sleep(gap)
                    conn.sendall(word)
                conn.sendall(end)
        except OSError:
            pass
        finally:
            conn.close()

    listener = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def client(port: int, tokens: int, mode: str) -> None:
    """Requests one after another, read as serve_bench reads them at concurrency 1."""
    print("streaming", flush=True)
    while True:
        serve_bench.solo_request(port, [2, 10, 11], tokens, mode)


# --- the measurement -------------------------------------------------------------------------------


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="openai_streamed,http_client_streamed")
    ap.add_argument("--split-cores", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--null-server", nargs=3, metavar=("PORT", "TOKENS", "GAP"), help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=3, metavar=("PORT", "TOKENS", "MODE"), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.null_server:
        return null_server(int(opts.null_server[0]), int(opts.null_server[1]), float(opts.null_server[2]))
    if opts.client:
        return client(int(opts.client[0]), int(opts.client[1]), opts.client[2])
    from mlx_gemma_mtp.blas import preload_openblas

    preload_openblas(sys.argv[0])  # as serve_bench runs stream_generate
    if opts.split_cores:
        serve_bench.pin(os.getpid(), {0})  # MLX's threads and OpenBLAS's, started below, inherit it
    pair, tokenizer, prompts, _ = serve_bench.build(argparse.Namespace(demo=True, requests=opts.prompts,
                                                                        inject=None, tokens=opts.tokens))
    gen = lambda p: serve_bench.generate_one(pair, tokenizer, p, opts.tokens, 0, {})[0]  # noqa: E731
    alone = statistics.median(gen(p) for p in prompts for _ in range(2))  # warm-up, and the pace
    gap = 1 / alone
    cores = "decoding on CPU 0, null server and client on CPU 1" if opts.split_cores else "every process on every core"
    report = {"model": "demo pair, held-out prompts", "setting": "plain decoding (0)", "cores": cores, "tokens": opts.tokens,
              "prompts": opts.prompts, "repeats": opts.repeats, "chunk_gap_ms": gap * 1e3, "modes": {}}
    lines = [f"demo pair, plain decoding; {opts.prompts} prompts x {opts.tokens} tokens x {opts.repeats} repeats; "
             f"null server paced at the decode's rate ({alone:.1f} tok/s: a chunk every {gap * 1e3:.2f} ms); {cores}",
             "client | stream_generate with / alone (median of pairs) | min | max | client CPU ms per chunk | "
             "null server CPU ms per chunk"]
    for mode in opts.modes.split(","):
        port = serve_bench.free_port()
        procs = [spawn("--null-server", str(port), str(opts.tokens), str(gap))]
        time.sleep(1.0)
        procs.append(spawn("--client", str(port), str(opts.tokens), mode))
        if opts.split_cores:
            for q in procs:
                os.sched_setaffinity(q.pid, {1})  # before either starts a thread
        try:
            procs[1].stdout.readline()  # imported and about to stream
            time.sleep(3.0)  # its first request under way
            stop = lambda sig: [os.kill(p.pid, sig) for p in procs]  # noqa: E731
            stop(signal.SIGSTOP)
            ratios, cpu, timed = [], [0.0, 0.0], 0.0
            for _ in range(opts.repeats):
                for p in prompts:
                    before = gen(p)
                    stop(signal.SIGCONT)
                    time.sleep(0.2)  # back to its steady pace
                    used = [serve_bench.cpu_seconds(q.pid) for q in procs]
                    start = time.perf_counter()
                    rate = gen(p)
                    timed += time.perf_counter() - start
                    cpu = [c + serve_bench.cpu_seconds(q.pid) - u for c, q, u in zip(cpu, procs, used)]
                    stop(signal.SIGSTOP)
                    if any(q.poll() is not None for q in procs):
                        raise SystemExit(f"the null server or the {mode} client stopped")
                    ratios.append(rate / ((before + gen(p)) / 2))
        finally:
            for q in procs:
                q.kill()
                q.wait()
        chunks = timed / gap
        entry = {"ratios": ratios, "median": statistics.median(ratios), "client_ms_per_chunk": cpu[1] / chunks * 1e3,
                 "null_server_ms_per_chunk": cpu[0] / chunks * 1e3}
        report["modes"][mode] = entry
        lines.append(f"{mode} | {entry['median']:.3f} | {min(ratios):.3f} | {max(ratios):.3f} | "
                     f"{entry['client_ms_per_chunk']:.2f} | {entry['null_server_ms_per_chunk']:.2f}")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if opts.out:
        serve_bench.write_results(opts.out, lines, report)


if __name__ == "__main__":
    main()
