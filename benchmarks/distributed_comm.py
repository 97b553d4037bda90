"""Per-round communication of the sharded target's verify forward on the 31B's shapes: 2 ranks
over 127.0.0.1 with the ring backend.

For K = 0..8 it counts the all-sums one verify forward of K + 1 tokens makes (and their bytes)
on a target with the 31B's per-layer shapes and `--layers` layers, scales the per-layer count to
the real 60 layers, and times that many all-sums of that size back to back (each waits for the
one before, as the layers do). The drafter adds nothing: it is replicated and reads the producer
layers' K/V, which every rank holds whole (mlx_gemma_mtp/model/sharding.py).

    python benchmarks/distributed_comm.py [--layers 2] [--reps 20] [--dtype bfloat16]

It starts its two ranks with the environment `mlx.launch --backend ring -n 2` gives them and writes
benchmarks/results/distributed_comm_31b_<dtype>.{txt,json}.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REAL_LAYERS = 60
KS = range(0, 9)


def rank_main(args):
    import mlx.core as mx
    from mlx_lm.models import gemma4_text

    from mlx_gemma_mtp.model.sharding import LocalHeads, shard_target
    from mlx_gemma_mtp.bench.shapes import SHAPES, target_args
    from mlx_gemma_mtp.model.target import target_view

    t0 = time.perf_counter()
    group = mx.distributed.init()
    dtype = getattr(mx, args.dtype)
    shape = SHAPES["31b"]
    model = gemma4_text.Model(target_args(shape, args.layers, vocab=1024))
    model.set_dtype(dtype)
    local = shard_target(model, group)
    mx.eval(model.parameters())
    view = target_view(model)
    view.forward_cache = lambda cache: [LocalHeads(c, *local[i]) if i in local else c for i, c in enumerate(cache)]

    calls = []
    real_all_sum = mx.distributed.all_sum

    def counting(x, *a, **kw):
        calls.append(x.nbytes)
        return real_all_sum(x, *a, **kw)

    rows = []
    say = (lambda *m: print(f"[{time.perf_counter() - t0:7.1f}s]", *m, file=sys.stderr, flush=True)) \
        if group.rank() == 0 else (lambda *m: None)
    say("weights evaluated")
    for k in KS:
        say(f"K={k}")
        cache = view.make_cache()
        from mlx_gemma_mtp.runtime.cache import reserve
        reserve(cache, 64 + k + 1)
        mx.eval(view.hidden(mx.zeros((1, 64), mx.uint32), cache), [c.state for c in cache])
        calls.clear()
        mx.distributed.all_sum = counting
        try:
            out = view.hidden(mx.zeros((1, k + 1), mx.uint32), cache)
        finally:
            mx.distributed.all_sum = real_all_sum
        mx.eval(out)
        per_layer_calls = len(calls) / args.layers
        per_layer_bytes = sum(calls) / args.layers
        n = round(per_layer_calls * REAL_LAYERS)
        x = mx.ones((1, k + 1, shape.hidden), dtype)
        mx.eval(real_all_sum(x, group=group))  # warm
        times = []
        for _ in range(args.reps):
            y = x
            start = time.perf_counter()
            for _ in range(n):
                y = real_all_sum(y, group=group) * 0.5  # each waits for the one before
            mx.eval(y)
            times.append(time.perf_counter() - start)
        one = []
        for _ in range(args.reps):
            start = time.perf_counter()
            mx.eval(real_all_sum(x, group=group))
            one.append(time.perf_counter() - start)
        rows.append(dict(k=k, tokens=k + 1, all_sums_per_layer=per_layer_calls,
                         bytes_per_layer=per_layer_bytes, all_sums_per_round=n,
                         bytes_per_round=per_layer_bytes * REAL_LAYERS,
                         seconds_per_round=statistics.median(times),
                         seconds_per_all_sum=statistics.median(one)))
    if group.rank() == 0:
        weights = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
        return dict(shape="31b", dtype=args.dtype, layers_built=args.layers, real_layers=REAL_LAYERS,
                    ranks=group.size(), transport="ring backend, TCP over 127.0.0.1 (one machine)",
                    machine=os.uname().machine, cpu_count=os.cpu_count(),
                    rank0_weight_bytes_built=weights, rows=rows)
    return None


def report(result) -> str:
    lines = [f"Sharded verify forward, Gemma 4 31B shapes ({result['real_layers']} layers; measured on "
             f"{result['layers_built']}), {result['ranks']} ranks, {result['dtype']}, {result['transport']}",
             f"{'K':>2} {'tokens':>6} {'all-sums':>8} {'bytes/round':>12} {'comm ms/round':>13} {'us/all-sum':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['k']:>2} {r['tokens']:>6} {r['all_sums_per_round']:>8} {r['bytes_per_round'] / 1e6:>10.2f}MB "
                     f"{r['seconds_per_round'] * 1e3:>13.2f} {r['seconds_per_all_sum'] * 1e6:>10.1f}")
    lines.append("drafter: 0 bytes (replicated; the producer layers' K/V are whole on every rank)")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out")
    args = p.parse_args()
    from mlx_gemma_mtp.bench.blas import preload_openblas

    preload_openblas(sys.argv[0])  # float32 matmuls of several tokens: see measuring.md
    if "MLX_RANK" in os.environ:
        result = rank_main(args)
        if result is not None:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"distributed_comm_31b_{args.dtype}.json"
    # The ranks get what `mlx.launch --backend ring -n 2` gives them (MLX_RANK and a hostfile of
    # 127.0.0.1 ports), started here: mlx.launch's output loop polls without blocking and keeps
    # about 70% of a core busy, a third of what this 2-core machine has for the ranks' timing.
    port = free_port()
    hostfile = RESULTS / ".distributed_comm_hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    command = [sys.executable, __file__, "--layers", str(args.layers), "--reps", str(args.reps),
               "--dtype", args.dtype, "--out", str(out)]
    ranks = [subprocess.Popen(command, env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)})
             for r in range(2)]
    try:
        codes = [r.wait(timeout=1800) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
        hostfile.unlink()
    if any(codes):
        sys.exit(f"error: the ranks failed (exit codes {codes})")
    text = report(json.loads(out.read_text()))
    out.with_suffix(".txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
