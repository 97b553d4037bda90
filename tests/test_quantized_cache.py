"""The quantized KV cache: its writes, rollbacks and row moves against dequantized expectations,
and greedy MTP (single stream and batch rows) equal to plain decoding with the same cache."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_mtp import generate
from mlx_gemma_mtp.bench.run import InjectedAcceptance
from mlx_gemma_mtp.runtime.cache import FullCache, SlidingCache, cache_bytes, concat_rows, reserve, set_offset, take_rows
from mlx_gemma_mtp.runtime.pair import Pair
from mlx_gemma_mtp.runtime.engine import Engine, Request
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.quantized_cache import (
    KVQuant, QuantizedFullCache, QuantizedSlidingCache, dequantize, is_quantized, quantize, quantize_cache,
)
from mlx_gemma_mtp.runtime.sampling import Sampling

Q8, Q4 = KVQuant(8, 32), KVQuant(4, 32)


def roundtrip(x, q):
    return dequantize(quantize(x, q), q)


def entries(rng, b, n, dim=32):
    return mx.array(rng.standard_normal((b, 2, n, dim)).astype(np.float32))


@pytest.mark.parametrize("q", [Q8, Q4], ids=["8bit", "4bit"])
def test_full_cache_writes_and_rollback_match_float(q):
    """Rows written at their own offsets, rolled back by different amounts and overwritten: every
    entry below each row's offset is the float cache's entry, quantized."""
    rng = np.random.default_rng(0)
    fl, qc = FullCache(2), QuantizedFullCache(q, 2)
    for c in (fl, qc):
        set_offset([c], mx.array([0, 5], mx.int32))
    for n, back in [(7, [0, 0]), (5, [3, 1]), (300, [0, 0]), (4, [200, 2]), (9, [0, 0])]:
        new_k, new_v = entries(rng, 2, n), entries(rng, 2, n)
        for c in (fl, qc):
            c.reserve(int(c.offset.max().item()) + n)
            c.update_and_fetch(new_k, new_v)
            set_offset([c], c.offset - mx.array(back, mx.int32))
    assert qc.capacity == fl.capacity and qc.offset.tolist() == fl.offset.tolist()
    got_k, got_v = dequantize(qc.keys, q), dequantize(qc.values, q)
    for row, length in enumerate(fl.offset.tolist()):
        np.testing.assert_array_equal(got_k[row, :, :length], roundtrip(fl.keys, q)[row, :, :length])
        np.testing.assert_array_equal(got_v[row, :, :length], roundtrip(fl.values, q)[row, :, :length])
    assert mx.array_equal(qc.make_mask(3), fl.make_mask(3)) and mx.array_equal(qc.visible(), fl.visible())


@pytest.mark.parametrize("q", [Q8, Q4], ids=["8bit", "4bit"])
def test_sliding_ring_writes_and_rollback_match_float(q):
    """Past several wraps of the ring, with rollbacks: slots, fetched [ring, new] and masks are the
    float ring's, quantized."""
    rng = np.random.default_rng(1)
    fl, qc = SlidingCache(16, 2), QuantizedSlidingCache(16, q, 2)
    for c in (fl, qc):
        set_offset([c], mx.array([3, 0], mx.int32))
    for n, back in [(5, [0, 0]), (60, [2, 4]), (9, [9, 0]), (200, [0, 17]), (3, [1, 1]), (5, [0, 0])]:
        new_k, new_v = entries(rng, 2, n), entries(rng, 2, n)
        out_f = fl.update_and_fetch(new_k, new_v)
        out_q = qc.update_and_fetch(new_k, new_v)
        np.testing.assert_array_equal(dequantize(out_q[0], q), roundtrip(out_f[0], q))
        np.testing.assert_array_equal(dequantize(out_q[1], q), roundtrip(out_f[1], q))
        for c in (fl, qc):
            set_offset([c], c.offset - mx.array(back, mx.int32))
    np.testing.assert_array_equal(dequantize(qc.keys, q), roundtrip(fl.keys, q))
    assert mx.array_equal(qc.make_mask(4), fl.make_mask(4)) and mx.array_equal(qc.visible(9), fl.visible(9))


def test_rows_move_between_caches_and_float_rows_join_quantized():
    rng = np.random.default_rng(2)
    q = Q4
    fl = [FullCache(1), SlidingCache(16, 1)]
    qc = [QuantizedFullCache(q, 2), QuantizedSlidingCache(16, q, 2)]
    reserve(fl, 40)
    reserve(qc, 300)
    for c in fl:
        c.update_and_fetch(entries(rng, 1, 40), entries(rng, 1, 40))
    for c in qc:
        c.update_and_fetch(entries(rng, 2, 300), entries(rng, 2, 300))
    joined = concat_rows([qc, fl])  # a float row joins a quantized batch: it is quantized
    assert is_quantized(joined) and [c.offset.tolist() for c in joined] == [[300, 300, 40]] * 2
    assert joined[0].capacity == 512
    np.testing.assert_array_equal(dequantize(joined[0].keys, q)[2, :, :40], roundtrip(fl[0].keys, q)[0, :, :40])
    np.testing.assert_array_equal(dequantize(joined[1].values, q)[2], roundtrip(fl[1].values, q)[0])
    picked = take_rows(joined, mx.array([2, 0]))
    assert is_quantized(picked) and picked[0].offset.tolist() == [40, 300]
    np.testing.assert_array_equal(dequantize(picked[1].keys, q)[1], dequantize(qc[1].keys, q)[0])
    # 4-bit, group 32, float32 scales and biases: 0.5 + 2 * 4 / 32 = 0.75 bytes per element, against 4
    assert cache_bytes(quantize_cache(fl, q)) == 0.75 / 4 * cache_bytes(fl)


def run(pair, prompts, max_tokens, k, q, filters=None):
    eng = Engine(pair, k, kv_quant=q)
    uids = [eng.insert(p, Request(max_tokens, Sampling(), frozenset(), None, filters[i] if filters else None))
            for i, p in enumerate(prompts)]
    out = {u: [] for u in uids}
    while eng.busy:
        for event in eng.step():
            out[event.uid] += event.tokens
        if eng.batch is not None:  # the rounds read the cache asked for
            assert is_quantized(eng.batch.cache) == (q is not None)
    return [out[u] for u in uids]


def prompts_for(window, seed):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(110, 512, size=n).tolist() for n in (window // 2, 2 * window + 7, window + 3)]


# every variant, both bit widths over the grid; K 2, 4 and adaptive single-stream, one of them batched
CASES = [("e2b", Q4), ("e2b", Q8), ("e4b", Q8), ("12b", Q4), ("26b", Q8), ("31b", Q4)]


@pytest.mark.parametrize("variant,q", CASES, ids=[f"{v}-{q.bits}bit" for v, q in CASES])
def test_mtp_equals_plain_with_quantized_cache(variant, q, loaded):
    pair, _ = loaded(variant)
    window = pair.view.args.sliding_window
    n = 4 * window + 5  # prompt + output past 4x the window: the rings wrap several times
    prompts = prompts_for(window, seed=len(variant) + q.bits)
    expected = run(Pair(pair.target), prompts, n + 16, 0, q)
    vocab = pair.view.args.vocab_size

    def filters(k):
        profile = [0.75] if k == "adaptive" else [(k - j) / (k - j + 1) for j in range(k)]
        return [InjectedAcceptance(e, len(p), profile, vocab, seed=i) for i, (p, e) in enumerate(zip(prompts, expected))]

    for k in (2, 4, "adaptive"):
        assert run(pair, prompts[:1], n, k, q, filters(k)[:1])[0] == expected[0][:n], k
    batch_k = {"e2b": 4, "e4b": "adaptive", "12b": 2, "26b": 4, "31b": "adaptive"}[variant]
    rows = run(pair, prompts, n, batch_k, q, filters(batch_k))
    for row, e in zip(rows, expected):
        assert row == e[:n]


def test_quantized_kv_start_converts_between_rounds(loaded):
    pair, _ = loaded("e2b")
    window = pair.view.args.sliding_window
    prompt = prompts_for(window, 3)[0]  # window // 2 tokens: float at first
    start = len(prompt) + 10
    eng = Engine(Pair(pair.target), 0, kv_quant=KVQuant(8, 32, start))
    uid = eng.insert(prompt, Request(40, Sampling()))
    seen = []
    while eng.busy:
        eng.step()
        if eng.batch is not None:
            seen.append((eng.rows[uid].offset if uid in eng.rows else None, is_quantized(eng.batch.cache)))
    offsets_float = [o for o, quant in seen if not quant]
    assert offsets_float and max(offsets_float) <= start + 1
    assert any(quant for _, quant in seen)
    # a long prompt passes the start during its prefill: converted between chunks
    eng = Engine(Pair(pair.target), 0, prefill_step=16, kv_quant=KVQuant(4, 32, 20))
    eng.insert([2] + list(range(110, 170)), Request(20, Sampling()))
    eng.step()
    assert eng.batch is not None and is_quantized(eng.batch.cache)


def test_boundary(loaded):
    pair, tokenizer = loaded("e2b")
    for kwargs, word in [({"kv_bits": 3}, "kv_bits"), ({"kv_bits": 4, "kv_group_size": 64}, "head dimensions"),
                         ({"kv_bits": 8, "kv_group_size": 48}, "kv_group_size"),
                         ({"kv_bits": 8, "quantized_kv_start": -1}, "quantized_kv_start"),
                         ({"prefill_step_size": 0}, "prefill_step_size")]:
        with pytest.raises(MTPError, match=word):
            generate(pair, tokenizer, "def f(x):", max_tokens=2, **kwargs)
    text = generate(pair, tokenizer, "def f(x):", max_tokens=3, kv_bits=4, kv_group_size=32, prefill_step_size=2)
    assert isinstance(text, str)


def test_cli_bad_cache_flags_are_one_line_errors():
    import subprocess
    import sys

    for flags, code in [(["--kv-bits", "3"], 2), (["--kv-bits", "4", "--kv-group-size", "128"], 1),
                        (["--prefill-step-size", "0"], 2)]:
        result = subprocess.run([sys.executable, "-m", "mlx_gemma_mtp.cli", "generate", "--demo", "--prompt", "x",
                                 "--max-tokens", "2", *flags], capture_output=True, text=True, timeout=120)
        assert result.returncode == code, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, lines
