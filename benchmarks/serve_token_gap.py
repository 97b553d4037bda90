"""Concurrency 1, demo pair: TTFT and the gap between streamed tokens through the server (the official
openai client, streamed completions, 6 held-out prompts x 64 tokens, 3 repeats after a warm-up)
against the same prompts' tokens from stream_generate in this process. Argument: 0 (plain) or
adaptive.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/serve_token_gap.py 0
"""
import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve_bench as sb  # noqa: E402
opts = argparse.Namespace(demo=True, requests=8, tokens=64, concurrency=[1], inject=None, shape=None, layers=None, vocab=None)
pair, tok, prompts, filters = sb.build(opts)
proc, port = sb.start_server(opts, sys.argv[1] if len(sys.argv) > 1 else "0")
from openai import AsyncOpenAI
from mlx_gemma_mtp.api import stream_generate
setting = 0 if (len(sys.argv) < 2 or sys.argv[1] == "0") else "adaptive"
async def one(client, p):
    sent = time.perf_counter(); stamps = []
    s = await client.completions.create(model="bench", prompt=p, max_tokens=64, temperature=0, stream=True)
    async for ch in s:
        if ch.choices and ch.choices[0].text:
            stamps.append(time.perf_counter())
    return stamps[0] - sent, (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps), stamps[-1] - sent
async def main():
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    out = []
    for rep in range(3):
        for p in prompts[:6]:
            out.append(await one(client, p))
    await client.close()
    return out
try:
    asyncio.run(main())  # warm
    srv = asyncio.run(main())
    gen = []
    for rep in range(3):
        for p in prompts[:6]:
            t = time.perf_counter(); st = [time.perf_counter() for _ in stream_generate(pair, tok, p, 64, setting)]
            gen.append((st[0] - t, (st[-1] - st[0]) / (len(st) - 1), len(st), st[-1] - t))
    med = lambda xs, i: statistics.median(x[i] for x in xs) * 1e3
    print("prompt lengths", [len(p) for p in prompts[:6]])
    for name, xs in (("server", srv), ("generate", gen)):
        print(f"{name}: ttft {med(xs,0):.1f} ms, gap {med(xs,1):.2f} ms, chunks {statistics.median(x[2] for x in xs)}, whole {med(xs,3):.0f} ms")
finally:
    proc.terminate(); proc.wait(15)
