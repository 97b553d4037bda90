"""The server's own cost at concurrency 1: the real app (engine thread, FastAPI on uvicorn,
127.0.0.1) runs in this process beside `stream_generate`, on the same loaded pair, and each request
(sent four ways: the openai client and http.client, streamed and not) runs between two
`stream_generate` runs of its prompt and is divided by their mean rate.

    python benchmarks/serve_overhead.py [--settings 0,adaptive] [--prompts 2] [--tokens 256]
        [--repeats 5] [--split-cores] [--out benchmarks/results/serve_overhead_demo]

serve_bench.py measures the same against a server in another process, as users run it; there the
two processes' copies of the weights take turns in the CPU's caches and the machine's drift between
processes adds to the noise. Here only the server's work differs. With --split-cores (Linux, with
OPENBLAS_NUM_THREADS=1) decoding runs on CPU 0 (the engine thread or this thread, and MLX's) and the
HTTP side on CPU 1 (the event loop, and this thread while it is the client), as on a machine with a
core to spare; without it every thread shares every core, so the client's CPU is taken from decoding.
"""

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_bench  # noqa: E402  (its request and timing helpers)


def start(pair, tokenizer, setting, tokens: int):
    """(uvicorn server, its thread, engine thread, port): the app as `gemma-mtp serve` runs it."""
    import uvicorn

    from mlx_gemma_mtp.server import app as srv
    from mlx_gemma_mtp.server.requests import Server

    worker = srv.Worker(lambda: (pair, tokenizer), setting, max_batch=8, max_queue=16, prompt_cache_bytes=0)
    worker.start()
    worker.ready.wait()
    port = serve_bench.free_port()
    config = uvicorn.Config(srv.create_app(Server(worker, "bench", tokens)), host="127.0.0.1", port=port,
                            log_level="warning", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return server, thread, worker, port


def measure(pair, tokenizer, prompts, setting, opts) -> dict:
    server, thread, worker, port = start(pair, tokenizer, setting, opts.tokens)
    gen = lambda p: serve_bench.generate_one(pair, tokenizer, p, opts.tokens, setting, {})[0]  # noqa: E731
    http_threads = {threading.main_thread().native_id, thread.native_id}
    every = os.sched_getaffinity(0)

    def as_decoder():
        if opts.split_cores:
            serve_bench.pin(os.getpid(), {0})

    def as_client():
        if opts.split_cores:
            serve_bench.pin(os.getpid(), {0}, {1}, http_threads)

    try:
        for p in prompts[:2]:  # warm-up: both paths meet every shape
            gen(p)
            serve_bench.solo_request(port, p, opts.tokens, "http_client_streamed")
        ratios, rates = {m: [] for m in serve_bench.SOLO_MODES}, []
        for rep in range(opts.repeats):
            for p in prompts:
                as_decoder()
                before = gen(p)
                rates.append(before)
                for m in serve_bench.SOLO_MODES:
                    as_client()
                    rate, _ = serve_bench.solo_request(port, p, opts.tokens, m)
                    as_decoder()
                    after = gen(p)
                    rates.append(after)
                    ratios[m].append(rate / ((before + after) / 2))
                    before = after
            print(f"{setting} repeat {rep + 1}: " + ", ".join(
                f"{m} {statistics.median(r[-len(prompts):]):.3f}" for m, r in ratios.items()), flush=True)
    finally:
        serve_bench.pin(os.getpid(), every)
        server.should_exit = True
        thread.join(timeout=10)
        worker.stop()
        worker.join(timeout=10)
    return {"generate_tok_s": statistics.median(rates),
            "over_generate": {m: statistics.median(r) for m, r in ratios.items()}, "pairs": ratios}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="0,adaptive", help="draft settings (0 = plain)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--split-cores", action="store_true")
    ap.add_argument("--out", type=Path, help="write OUT.txt and OUT.json")
    opts = ap.parse_args()
    from mlx_gemma_mtp.bench.blas import preload_openblas

    preload_openblas(sys.argv[0])  # float32 matmuls of several tokens: see measuring.md
    from mlx_gemma_mtp.model import demo
    from mlx_gemma_mtp.api import prompt_ids

    pair, tokenizer = demo.load_demo()
    prompts = [prompt_ids(pair, tokenizer, t) for t in demo.held_out_prompts(opts.prompts)]
    report = {"model": "demo pair, held-out prompts", "prompts": opts.prompts, "tokens": opts.tokens,
              "repeats": opts.repeats, "split_cores": opts.split_cores,
              "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "all cores"), "settings": {}}
    for s in opts.settings.split(","):
        report["settings"][s] = measure(pair, tokenizer, prompts, s if s == "adaptive" else int(s), opts)
    cores = ("decoding on CPU 0, event loop and client on CPU 1" if opts.split_cores else "every thread on every core")
    lines = [f"{report['model']}; {opts.prompts} prompts x {opts.tokens} tokens x {opts.repeats} repeats; greedy; "
             f"server in this process; {cores}; OpenBLAS threads: {report['openblas_threads']}",
             "setting | generate tok/s | server over stream_generate (median of pairs): " +
             " | ".join(serve_bench.SOLO_MODES)]
    for s, r in report["settings"].items():
        lines.append(f"{s} | {r['generate_tok_s']:.1f} | " +
                     " | ".join(f"{r['over_generate'][m]:.3f}" for m in serve_bench.SOLO_MODES))
    print("\n".join(lines))
    if opts.out:
        serve_bench.write_results(opts.out, lines, report)


if __name__ == "__main__":
    main()
