"""The server under load: TTFT, inter-chunk latency and aggregate tok/s at several concurrencies,
MTP against plain decoding, and the server at concurrency 1 against `generate` in this process.

    python benchmarks/serve_bench.py --demo [--settings 0,adaptive] [--concurrency 1,4,8]
        [--requests 16] [--tokens 96] [--repeats 3] [--split-cores] [--out benchmarks/results/serve_demo]
    python benchmarks/serve_bench.py --shape e2b --layers 6 --inject 0.8,0.7,0.6,0.5 ...

For each draft setting a server (this script in `--child` mode: the real app and engine thread on
uvicorn, 127.0.0.1, a free port, no prompt cache so every request prefills) is started, warmed
up, and driven with the official `openai` client: for each repeat, every concurrency runs the same
greedy streaming requests. At concurrency 1 each prompt is then sent four ways (the openai client
and a bare http.client reader, streamed and not: `solo_ratios`), each between two `stream_generate`
runs of that prompt here while the server is idle, and divided by their mean rate. With --inject,
the server's rows and `generate` get the same injected acceptance (bench.InjectedAcceptance). The
CPU time the server process, this client and `stream_generate` spend per token is recorded: on a
2-core machine that CPU is what the server loses against an in-process loop.
With --split-cores (and OPENBLAS_NUM_THREADS=1) those concurrency-1 runs put decoding on CPU 0 and
the HTTP side (the server's event loop, this process while it is the client) on CPU 1.
Speeds on a Linux CPU are only meaningful as ratios (see measuring.md).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def build(opts):
    """(pair, tokenizer, prompts as token ids, {prompt ids: draft filter factory})."""
    import mlx.core as mx

    from mlx_gemma_mtp.api import prompt_ids
    from mlx_gemma_mtp.bench.run import InjectedAcceptance, parse_profile
    from mlx_gemma_mtp.runtime.engine import generate_tokens

    if opts.demo:
        from mlx_gemma_mtp.model import demo

        pair, tokenizer = demo.load_demo()
        texts = demo.held_out_prompts(opts.requests)
        prompts = [prompt_ids(pair, tokenizer, t) for t in texts]
    else:
        from mlx_gemma_mtp.bench import shapes

        pair = shapes.random_pair(opts.shape, opts.layers, opts.vocab, seed=0)
        tokenizer = shapes.word_tokenizer(opts.vocab)
        # mixed lengths: 24..88 tokens
        prompts = [[2] + [(97 * i + 13 * j) % (opts.vocab - 10) + 10 for j in range(23 + 16 * (i % 5))]
                   for i in range(opts.requests)]
    filters = {}
    if opts.inject:
        profile, vocab = parse_profile(opts.inject), pair.view.args.vocab_size
        for i, p in enumerate(prompts):
            plain = [t for t, _ in generate_tokens(pair, p, opts.tokens + 20, 0)]
            filters[tuple(p)] = (lambda plain=plain, n=len(p), i=i:
                                 InjectedAcceptance(plain, n, profile, vocab, seed=i))
    mx.clear_cache()
    return pair, tokenizer, prompts, filters


# --- the server (child process) ------------------------------------------------------------------


def serve_child(opts) -> None:
    import uvicorn

    from mlx_gemma_mtp.server import app as srv
    from mlx_gemma_mtp.server.requests import Server

    filters = {}

    class BenchWorker(srv.Worker):
        def _insert(self, job):
            make = filters.get(tuple(job.ids))
            if make is not None:
                job.request.draft_filter = make()
            super()._insert(job)

    def loader():  # in the engine thread, which owns MLX
        pair, tokenizer, _, made = build(opts)
        filters.update(made)
        return pair, tokenizer

    setting = opts.child_setting if opts.child_setting == "adaptive" else int(opts.child_setting)
    worker = BenchWorker(loader, setting, max_batch=max(8, opts.max_concurrency), max_queue=256,
                         prompt_cache_bytes=0)
    worker.start()
    worker.ready.wait()
    if worker.load_error is not None:
        raise worker.load_error
    app = srv.create_app(Server(worker, "bench", opts.tokens))
    try:
        uvicorn.run(app, host="127.0.0.1", port=opts.port, log_level="warning", http="h11")
    finally:
        worker.stop()
        worker.join(timeout=5)


# --- the driver ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(opts, setting: str):
    port = free_port()
    args = [sys.executable, __file__, "--child", "--child-setting", setting, "--port", str(port),
            "--requests", str(opts.requests), "--tokens", str(opts.tokens),
            "--max-concurrency", str(max(opts.concurrency))]
    args += ["--demo"] if opts.demo else ["--shape", opts.shape, "--layers", str(opts.layers), "--vocab", str(opts.vocab)]
    if opts.inject:
        args += ["--inject", opts.inject]
    proc = subprocess.Popen(args)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server for setting {setting} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 600 s")


async def one_request(client, prompt: list, tokens: int, stream: bool = True) -> dict:
    sent = time.perf_counter()
    if not stream:  # one response: no per-chunk work on either side
        done = await client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0)
        n = done.usage.completion_tokens
        return {"ttft": None, "gaps": [], "tokens": n, "chunks": 1, "rate": n / (time.perf_counter() - sent)}
    stamps, usage = [], None
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    n = usage.completion_tokens
    # tokens over the whole request (prefill included): the first chunk's token count is not
    # known (text held back by the detokenizer can carry a round's tokens), so no rate from it
    return {"ttft": stamps[0] - sent, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": n,
            "chunks": len(stamps), "rate": n / (stamps[-1] - sent)}


def bare_request(port: int, prompt: list, tokens: int, stream: bool) -> tuple:
    """(tokens per second, tokens) of one request sent with http.client and read line by line: the server
    measured without the openai client's per-chunk work, which on a 2-core machine takes CPU
    from the decode it measures."""
    import http.client

    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    sent = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if not stream:
            n = json.loads(reply.read())["usage"]["completion_tokens"]
            return n / (time.perf_counter() - sent), n
        last = n = None
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            data = json.loads(line[6:])
            if data["choices"] and data["choices"][0]["text"]:
                last = time.perf_counter()
            if data.get("usage"):
                n = data["usage"]["completion_tokens"]
        return n / (last - sent), n
    finally:
        conn.close()


async def run_pass(port: int, prompts: list, tokens: int, concurrency: int, stream: bool = True) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    todo = list(enumerate(prompts))
    results = [None] * len(prompts)

    async def client_loop():
        while todo:
            i, p = todo.pop(0)
            results[i] = await one_request(client, p, tokens, stream)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    gaps = [g for r in results for g in r["gaps"]]
    total = sum(r["tokens"] for r in results)
    return {"aggregate_tok_s": total / wall, "tokens": total, "ttft": [r["ttft"] for r in results if r["ttft"] is not None], "gaps": gaps,
            "tokens_per_chunk": total / sum(r["chunks"] for r in results),
            "rate": statistics.mean(r["rate"] for r in results)}


def generate_one(pair, tokenizer, prompt, tokens, setting, filters) -> tuple:
    """(rate of stream_generate on one prompt: tokens over the whole call, as a request's; tokens)."""
    from mlx_gemma_mtp.api import stream_generate

    make = filters.get(tuple(prompt))
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream_generate(
        pair, tokenizer, prompt, tokens, setting, draft_filter=make() if make else None)]
    return len(stamps) / (stamps[-1] - start), len(stamps)


# concurrency 1 through the server: the openai client or http.client (bare_request), streamed or not
SOLO_MODES = ("openai_streamed", "openai_not_streamed", "http_client_streamed", "http_client_not_streamed")


def solo_request(port: int, prompt: list, tokens: int, mode: str) -> tuple:
    """(tokens per second, tokens) of one request sent the way `mode` says."""
    stream = not mode.endswith("not_streamed")
    if mode.startswith("openai"):
        done = asyncio.run(run_pass(port, [prompt], tokens, 1, stream))
        return done["rate"], done["tokens"]
    return bare_request(port, prompt, tokens, stream)


def pin(pid: int, cores: set, http_cores: "set | None" = None, http_threads: "set | None" = None) -> None:
    """Every thread of process PID onto CPUs `cores`; with `http_cores`, the threads in
    `http_threads` (by default the main thread: a server's event loop) onto those."""
    http_threads = {pid} if http_threads is None else http_threads
    for task in (Path("/proc") / str(pid) / "task").iterdir():
        tid = int(task.name)
        try:
            os.sched_setaffinity(tid, http_cores if http_cores and tid in http_threads else cores)
        except ProcessLookupError:  # a thread that has just ended
            pass


def solo_ratios(port, pid, pair, tokenizer, prompts, tokens, setting, filters, split=False) -> tuple:
    """The server at concurrency 1 against stream_generate here, interleaved request by request:
    each server request runs between two stream_generate runs of its prompt and is divided by
    their mean rate, so the machine's drift (runs minutes apart differed by up to 40% here)
    cancels. -> (stream_generate's rates, {mode: [ratio per prompt], server_ms, client_ms,
    generate_ms: CPU per token of the server process and this client (openai streamed) and of
    stream_generate}).
    With `split`, the decoding runs on CPU 0 and the HTTP side on CPU 1, as on a machine with a core
    to spare: the server's threads but its event loop (the main thread) and this process while it
    runs stream_generate on CPU 0; the event loop and this process while it is the client on CPU 1."""
    gen, out = [], {m: [] for m in SOLO_MODES}
    cpu = {"server": 0.0, "client": 0.0, "generate": 0.0}
    counted = {"streamed": 0, "generate": 0}
    every = os.sched_getaffinity(0)
    if split:
        pin(pid, {0}, http_cores={1})

    def generated(prompt) -> float:
        if split:
            pin(os.getpid(), {0})
        before, (rate, n) = time.process_time(), generate_one(pair, tokenizer, prompt, tokens, setting, filters)
        cpu["generate"] += time.process_time() - before
        counted["generate"] += n
        return rate

    for p in prompts:
        rates = [generated(p)]
        for m in SOLO_MODES:
            if split:
                pin(os.getpid(), {1})
            server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
            rate, n = solo_request(port, p, tokens, m)
            if m == "openai_streamed":
                cpu["server"] += cpu_seconds(pid) - server_cpu
                cpu["client"] += time.process_time() - client_cpu
                counted["streamed"] += n
            rates.append(generated(p))
            out[m].append(rate / ((rates[-2] + rates[-1]) / 2))
        gen += rates
    if split:
        pin(pid, every)
        pin(os.getpid(), every)
    out.update(server_ms=cpu["server"] / counted["streamed"] * 1e3, client_ms=cpu["client"] / counted["streamed"] * 1e3,
               generate_ms=cpu["generate"] / counted["generate"] * 1e3)
    return gen, out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process PID so far (all its threads)."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--shape", default="e2b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--inject", help="injected acceptance profile, e.g. 0.8,0.7,0.6,0.5")
    ap.add_argument("--settings", default="0,adaptive", help="draft settings (0 = plain)")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write OUT.txt and OUT.json")
    ap.add_argument("--split-cores", action="store_true",
                    help="concurrency 1 against generate with decoding on CPU 0 and the HTTP side (event loop, "
                         "client) on CPU 1 (Linux; run with OPENBLAS_NUM_THREADS=1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-setting", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-concurrency", type=int, default=8, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    from mlx_gemma_mtp.bench.blas import preload_openblas

    preload_openblas(sys.argv[0])  # float32 matmuls of several tokens: see measuring.md
    if opts.child:
        return serve_child(opts)
    opts.concurrency = [int(c) for c in opts.concurrency.split(",")]
    settings = opts.settings.split(",")
    pair, tokenizer, prompts, filters = build(opts)
    solo = prompts[: max(2, opts.requests // 4)]  # concurrency 1 decodes these (and generate too)
    report = {"model": "demo pair, held-out prompts" if opts.demo else
              f"random float32 {opts.shape} shapes, {opts.layers} layers, vocab {opts.vocab}",
              "injected": opts.inject, "requests": opts.requests, "tokens": opts.tokens,
              "repeats": opts.repeats, "settings": {}}
    for setting in settings:
        proc, port = start_server(opts, setting)
        try:
            value = setting if setting == "adaptive" else int(setting)
            asyncio.run(run_pass(port, prompts[:2], opts.tokens, 2))  # warm-up
            generate_one(pair, tokenizer, solo[0], opts.tokens, value, filters)  # warm-up
            runs = {c: [] for c in opts.concurrency}
            gen, ratios, cpu = [], {m: [] for m in SOLO_MODES}, []
            for rep in range(opts.repeats):
                for c in opts.concurrency:
                    runs[c].append(asyncio.run(run_pass(port, solo if c == 1 else prompts, opts.tokens, c)))
                if 1 in runs:
                    rates, spent = solo_ratios(port, proc.pid, pair, tokenizer, solo, opts.tokens, value, filters,
                                                opts.split_cores)
                    gen += rates
                    cpu.append(spent)
                    for m in SOLO_MODES:
                        ratios[m] += spent.pop(m)
                print(f"{setting} repeat {rep + 1}: " + ", ".join(
                    f"c={c} {runs[c][-1]['aggregate_tok_s']:.1f} tok/s" for c in opts.concurrency) +
                    (f"; generate {statistics.median(rates):.1f} tok/s; c=1 over generate: " + ", ".join(
                        f"{m} {statistics.median(ratios[m][-len(solo):]):.3f}" for m in SOLO_MODES)
                     if 1 in runs else ""), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        out = {"generate_tok_s": statistics.median(gen) if gen else None,
               "c1_over_generate": {m: statistics.median(r) for m, r in ratios.items()} if gen else None,
               "c1_over_generate_pairs": ratios if gen else None,
               "cpu_ms_per_token_c1": {k: statistics.median(c[k] for c in cpu) for k in cpu[0]} if cpu else None,
               "concurrency": {}}
        for c in opts.concurrency:
            rs = runs[c]
            ttft = [t for r in rs for t in r["ttft"]]
            gaps = [g for r in rs for g in r["gaps"]]
            out["concurrency"][str(c)] = {
                "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in rs),
                "aggregate_tok_s_runs": [r["aggregate_tok_s"] for r in rs],
                "request_tok_s": statistics.median(r["rate"] for r in rs),
                "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
                "chunk_gap_p50_s": pct(gaps, 0.5), "chunk_gap_p99_s": pct(gaps, 0.99),
                "tokens_per_chunk": statistics.mean(r["tokens_per_chunk"] for r in rs),
            }
        report["settings"][setting] = out
    # OPENBLAS_NUM_THREADS=1 leaves the second core of a 2-core machine to the client and the event
    # loop, as a Mac's GPU leaves its CPU cores: the server's own overhead, not the CPU it shares
    report["openblas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS", "all cores")
    report["split_cores"] = opts.split_cores
    lines = [f"{report['model']}; injected acceptance {opts.inject}; {opts.requests} requests x {opts.tokens} "
             f"tokens (concurrency 1: {len(solo)}); greedy, streaming, no prompt cache; median of {opts.repeats} "
             f"repeats; OpenBLAS threads: {report['openblas_threads']}" +
             ("; concurrency 1 against generate with decoding on CPU 0, event loop and client on CPU 1"
              if opts.split_cores else ""),
             "setting | concurrency | aggregate tok/s | vs plain | TTFT p50/p99 ms | chunk gap p50/p99 ms | "
             "tokens/chunk | per-request tok/s"]
    plain = report["settings"].get("0")
    for setting, out in report["settings"].items():
        for c, r in out["concurrency"].items():
            vs = f"{r['aggregate_tok_s'] / plain['concurrency'][c]['aggregate_tok_s']:.3f}" if plain else "-"
            lines.append(f"{setting} | {c} | {r['aggregate_tok_s']:.1f} | {vs} | {r['ttft_p50_s'] * 1e3:.0f}/"
                         f"{r['ttft_p99_s'] * 1e3:.0f} | {r['chunk_gap_p50_s'] * 1e3:.1f}/{r['chunk_gap_p99_s'] * 1e3:.1f}"
                         f" | {r['tokens_per_chunk']:.2f} | {r['request_tok_s']:.1f}")
    for s, o in report["settings"].items():
        if o["c1_over_generate"] is not None:
            r, c = o["c1_over_generate"], o["cpu_ms_per_token_c1"]
            lines.append(f"{s}, concurrency 1, over stream_generate (tokens over the whole request; each request between "
                         f"two stream_generate runs of its prompt; median of {len(o['c1_over_generate_pairs']['openai_streamed'])}): "
                         f"openai client streamed {r['openai_streamed']:.3f}, not streamed {r['openai_not_streamed']:.3f}; "
                         f"http.client streamed {r['http_client_streamed']:.3f}, not streamed "
                         f"{r['http_client_not_streamed']:.3f}; CPU ms per streamed token: server {c['server_ms']:.2f}, "
                         f"client {c['client_ms']:.2f}, stream_generate {c['generate_ms']:.2f}")
    print("\n".join(lines))
    if opts.out:
        write_results(opts.out, lines, report)


def write_results(out: Path, lines: list, report: dict) -> None:
    """OUT.txt (the printed lines) and OUT.json (the report)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # OUT may hold dots (an acceptance profile): append, never replace, a suffix
    Path(f"{out}.txt").write_text("\n".join(lines) + "\n")
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
