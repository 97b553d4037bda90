"""What a server's threading costs a token: the demo pair's plain decoding (generate_tokens, 64
tokens, 6 held-out prompts, 3 interleaved repeats) in the main thread, in a worker thread, and in a
worker thread that wakes an asyncio loop in the main thread for every token (as the server's engine
thread does); then whether mx.eval releases the GIL (a Python thread counting during an eval).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/engine_thread_cost.py
"""
import asyncio
import statistics
import threading
import time

import mlx.core as mx

from mlx_gemma_mtp.demo import load_demo, held_out_prompts
from mlx_gemma_mtp.engine import generate_tokens
pair, tok = load_demo()
prompts = [tok.encode(p) for p in held_out_prompts(6)]
def run(p, on_token=None):
    st = []
    for t, _ in generate_tokens(pair, p, 64, 0):
        st.append(time.perf_counter())
        if on_token: on_token(t)
    return (st[-1] - st[0]) / (len(st) - 1)
def main_thread():
    return [run(p) for p in prompts]
def worker():
    out = []
    th = threading.Thread(target=lambda: out.extend(run(p) for p in prompts)); th.start(); th.join()
    return out
def worker_loop():
    out = []
    async def go():
        loop = asyncio.get_running_loop(); q = asyncio.Queue(); done = asyncio.Event()
        def work():
            out.extend(run(p, lambda t: loop.call_soon_threadsafe(q.put_nowait, t)) for p in prompts)
            loop.call_soon_threadsafe(done.set)
        th = threading.Thread(target=work); th.start()
        while not done.is_set():
            try:
                await asyncio.wait_for(q.get(), 0.5)
            except asyncio.TimeoutError:
                pass
        th.join()
    asyncio.run(go())
    return out
main_thread()
res = {n: [] for n in ("main", "worker", "worker+loop")}
for rep in range(3):
    for name, fn in (("main", main_thread), ("worker", worker), ("worker+loop", worker_loop)):
        res[name] += fn()
for n, v in res.items():
    print(n, f"{statistics.median(v)*1e3:.2f} ms/token")


# --- does mx.eval release the GIL? ---
a = mx.random.normal((600, 600)); mx.eval(a)
def work():
    x = a
    for _ in range(20):
        x = (x @ a) * 1e-3
    return x
stop = False; count = [0]
def spin():
    while not stop:
        count[0] += 1
t0 = time.perf_counter(); mx.eval(work()); solo = time.perf_counter() - t0
th = threading.Thread(target=spin); th.start()
time.sleep(0.2); c0 = count[0]; t0 = time.perf_counter(); mx.eval(work()); dt = time.perf_counter() - t0; c1 = count[0]
stop = True; th.join()
# reference rate: counter alone
count[0] = 0; stop = False; th = threading.Thread(target=spin); th.start(); time.sleep(dt); stop = True; th.join()
print(f"eval alone {solo*1e3:.0f} ms, with spinner {dt*1e3:.0f} ms; spinner counts during eval {c1-c0}, alone in the same time {count[0]}")
