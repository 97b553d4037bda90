"""Apple GPU housekeeping as mlx-lm does it, observed through the MLX calls it makes (the CPU
has no wired memory, so the device's answers are faked where Metal would give them)."""

import mlx.core as mx
import pytest

from mlx_gemma_mtp import batch_generate, generate
from mlx_gemma_mtp.model.demo import load_demo
from mlx_gemma_mtp.runtime.housekeeping import generation_stream

RECOMMENDED = 48 << 30


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture
def calls(monkeypatch):
    """Record set_wired_limit, the streams generation runs on, and cache releases."""
    seen = {"wired": [], "streams": [], "clear": 0}
    info = mx.device_info()
    monkeypatch.setattr(mx, "device_info", lambda *a: {**info, "max_recommended_working_set_size": RECOMMENDED})

    def set_wired_limit(n):
        seen["wired"].append(n)
        return 7  # the limit before

    real_stream, real_clear = mx.stream, mx.clear_cache

    def stream(s):
        seen["streams"].append(s)
        return real_stream(s)

    def clear_cache():
        seen["clear"] += 1
        real_clear()

    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(mx, "stream", stream)
    monkeypatch.setattr(mx, "clear_cache", clear_cache)
    return seen


def test_generation_raises_the_wired_limit_and_restores_it(demo, calls):
    generate(*demo, "def f(x):", max_tokens=8)
    assert calls["wired"] == [RECOMMENDED, 7]
    batch_generate(*demo, ["def f(x):", "import os"], max_tokens=8)
    assert calls["wired"] == [RECOMMENDED, 7] * 2


def test_rounds_run_on_the_generation_stream(demo, calls):
    generate(*demo, "def f(x):", max_tokens=8)
    assert calls["streams"] and all(s is generation_stream for s in calls["streams"])


def test_a_long_prompt_releases_the_cache_between_prefill_chunks(demo, calls):
    model, tokenizer = demo
    prompt = tokenizer.encode("x = 1\n" * 100)
    generate(model, tokenizer, prompt, max_tokens=2, prefill_step_size=64)
    assert calls["clear"] >= len(prompt) // 64 - 1


def test_the_server_keeps_weights_wired_and_releases_the_cache_when_idle(calls):
    import time

    from mlx_gemma_mtp.server.worker import Worker

    worker = Worker(load_demo, num_draft_tokens=2, warm_up=True)
    worker.start()
    try:
        assert worker.ready.wait(120) and worker.load_error is None
        assert calls["wired"] == [RECOMMENDED]  # raised once for the process, never lowered
        deadline = time.monotonic() + 10
        while not calls["clear"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls["clear"] >= 1  # the warm-up's buffers, released when the loop fell idle
    finally:
        worker.stop()
        worker.join(timeout=30)
