"""The bundled demo pair: small enough to ship, loads offline, exact, and its drafter drafts well."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma_mtp.model import demo
from mlx_gemma_mtp.runtime.pair import Pair, Stats
from mlx_gemma_mtp.runtime.engine import generate_tokens

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")


@pytest.fixture(scope="module")
def demo_pair():
    return demo.load_demo()


def test_demo_pair_is_shipped_and_small():
    files = [f for f in demo.PAIR_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 10**6
    manifest = json.loads((demo.PAIR_DIR / "mtp.json").read_text())
    assert manifest["draft"] is not None


def test_demo_metadata_describes_the_shipped_files():
    import mlx.core as mx

    from mlx_gemma_mtp.model.checkpoint import DTYPE_NAMES, read_manifest

    manifest = read_manifest(demo.PAIR_DIR)
    for part in ("target", "draft"):
        record = manifest[part]
        # no path of the machine that built it
        assert not Path(record["source"]).is_absolute() and "/" not in record["source"]
        config = json.loads((demo.PAIR_DIR / record["path"] / "config.json").read_text())
        weights = mx.load(str(demo.PAIR_DIR / record["path"] / "model.safetensors"))
        dtypes = {DTYPE_NAMES[v.dtype] for v in weights.values()}
        assert dtypes == {config["dtype"]} == {record["dtype"]}, part


def test_held_out_split_is_disjoint_and_stable():
    train, held = demo.split_files()
    assert held and train and not set(train) & set(held)
    assert len(held) < len(train) / 10
    assert demo.split_files() == (train, held)
    prompts = demo.held_out_prompts(4)
    texts = [demo.read_text(p) for p in held]
    assert len(prompts) == 4 and all(any(p in t for t in texts) for p in prompts)


def test_greedy_mtp_is_plain_decoding_on_the_demo(demo_pair):
    pair, tokenizer = demo_pair
    prompt = tokenizer.encode(demo.held_out_prompts(1)[0])
    plain = [t for t, _ in generate_tokens(Pair(pair.target), prompt, 96, 0)]
    for k in (1, 3, 5):
        stats = Stats()
        assert [t for t, _ in generate_tokens(pair, prompt, 96, k, stats=stats)] == plain
        assert stats.acceptance_per_position[0] > 0.3  # a trained drafter, not a random one


def test_generate_demo_runs_offline():
    prompt = "def parse_args(argv):"
    result = subprocess.run([GEMMA_MTP, "generate", "--demo", "--prompt", prompt, "--max-tokens", "40"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt) and len(result.stdout) > len(prompt) + 20
    assert "tok/s" in result.stderr


def test_generate_demo_refuses_chat_and_model():
    result = subprocess.run([GEMMA_MTP, "generate", "--demo", "--chat", "--prompt", "x"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "chat template" in result.stderr and "Traceback" not in result.stderr


def test_bench_demo_reports_real_acceptance(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([GEMMA_MTP, "bench", "--demo", "--held-out-prompts", "1", "--tokens", "24",
                             "--repeats", "1", "--ks", "3", "--no-adaptive", "--no-mlx-lm", "--json", out],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    (mtp,) = report["mtp"]
    assert mtp["num_draft_tokens"] == 3 and mtp["acceptance_injected"] is False
    assert mtp["acceptance_per_position"][0] > 0.3
    assert "held-out" in report["model"]
