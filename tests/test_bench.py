"""`gemma-mtp bench` on tiny shapes: the report's contents and the injected acceptance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma_mtp.bench import run as b
from mlx_gemma_mtp.bench import report as r
from mlx_gemma_mtp.bench import shapes
from mlx_gemma_mtp.bench.blas import REEXEC_MARK
from mlx_gemma_mtp.cli import main
from mlx_gemma_mtp.errors import MTPError

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")

TINY = shapes.Shape(hidden=64, heads=2, kv_heads=1, intermediate=128, sliding_per_full=2, window=16, real_layers=6,
               kv_shared=2, per_layer_input=16, double_wide_mlp=True, draft_hidden=32, draft_intermediate=64,
               centroid_head=True)
VOCAB = 512


@pytest.fixture(scope="module")
def tiny_pair():
    shapes.SHAPES["tiny"] = TINY
    try:
        yield shapes.random_pair("tiny", 6, VOCAB, seed=1), shapes.word_tokenizer(VOCAB)
    finally:
        del shapes.SHAPES["tiny"]


def prompt(n=12, seed=0):
    return [2] + np.random.default_rng(seed).integers(10, VOCAB, size=n - 1).tolist()


def kept(f, position, k):
    """Which of k drafts after `position` the filter made right (the drafter guessed none)."""
    right = f.continuation[position + 1 - f.prompt_len : position + 1 - f.prompt_len + k]
    out = f(mx.full((1, k), 3, mx.int32), mx.array([position])).tolist()[0]
    return [o == r for o, r in zip(out, right)]


def test_injected_draws_follow_the_profile():
    profile = [0.9, 0.6, 0.3]
    f = b.InjectedAcceptance(list(range(10, 5000)), 4, profile, VOCAB, seed=3)
    keeps = np.array([kept(f, p, 5) for p in range(4, 3004)])
    # conditional acceptance: position j is accepted given every earlier one was
    reached = np.ones(len(keeps), bool)
    for j, expected in enumerate(profile + [0.3, 0.3]):  # the last value repeats
        rate = keeps[reached, j].mean()
        assert abs(rate - expected) < 0.05, (j, rate, expected)
        reached &= keeps[:, j]
    assert kept(f, 42, 3) == kept(f, 42, 5)[:3]  # the same draws at a position, whatever K
    assert kept(f, 42, 5) == kept(f, 42, 5)  # tabled: every setting meets the same draws


def test_filter_replaces_drafts_and_keeps_the_drafter_in_the_graph():
    f = b.InjectedAcceptance([7, 8, 9, 10, 11], prompt_len=3, profile=[1.0, 0.0], vocab=VOCAB)
    drafts = mx.array([[8, 9, 5]], mx.int32)  # the drafter happened to guess position 1 and 2 right
    out = f(drafts, mx.array([3])).tolist()[0]  # drafts for positions 4, 5, 6 -> continuation[1:4]
    assert out[0] == 8  # accepted: the target's token
    assert out[1] != 9 and out[2] != 10  # rejected: never the right token


def test_injection_gives_the_acceptance_in_a_real_run(tiny_pair):
    pair, _ = tiny_pair
    p = prompt()
    plain = b.run_ours(pair, p, 40, 0).tokens
    for profile, tokens_per_round in (([1.0], 4.0), ([0.0], 1.0)):
        f = b.InjectedAcceptance(plain + [0] * 10, len(p), profile, VOCAB)
        run = b.run_ours(pair, p, 40, 3, f)
        assert run.tokens == plain  # greedy output is the target's whatever the drafts
        assert abs(run.stats.tokens_per_round - tokens_per_round) < 0.15


def rounds_of(pair, prompt_ids, tokens, k, sampling=None):
    from mlx_gemma_mtp.runtime.pair import Stats
    from mlx_gemma_mtp.runtime.engine import generate_tokens

    stats = Stats()
    out = [t for t, _ in generate_tokens(pair, prompt_ids, tokens, k, stats=stats, sampling=sampling)]
    return out, stats.round_log


def test_compiled_draft_step_drafts_what_the_eager_step_drafts(tiny_pair):
    """The compiled step reads the whole K/V buffers through masks: before the sliding window (16)
    fills, after it, across the full layer's buffer growth (256 tokens) and after rollbacks, its
    drafts are the eager step's."""
    from mlx_gemma_mtp.runtime.sampling import Sampling

    pair, _ = tiny_pair
    short, long = prompt(6, seed=4), prompt(240, seed=5)
    assert len(long) + 60 > 256  # the full layer's buffer grows during the long run
    results = {}
    try:
        for compiled in (True, False):
            pair.compile_draft = compiled
            results[compiled] = [rounds_of(pair, short, 30, 3), rounds_of(pair, long, 60, 3),
                                 rounds_of(pair, long, 30, 4, Sampling(temperature=1.0, seed=7))]
    finally:
        pair.compile_draft = True
    # the output, every round's drafts and accepted counts
    assert results[True] == results[False]


def test_compiled_draft_step_sees_new_weights(tiny_pair):
    pair, _ = tiny_pair
    p = prompt(20, seed=6)
    before = rounds_of(pair, p, 12, 3)[1]
    weight = pair.drafter.pre_projection.weight
    try:
        pair.drafter.pre_projection.weight = -2 * weight
        after = rounds_of(pair, p, 12, 3)[1]
        pair.compile_draft = False
        eager = rounds_of(pair, p, 12, 3)[1]
    finally:
        pair.drafter.pre_projection.weight = weight
        pair.compile_draft = True
    assert after == eager and after != before


def test_report_has_the_required_keys_and_plots(tiny_pair, tmp_path):
    pair, tokenizer = tiny_pair
    tokenizer.eos_token_ids = set()
    opts = b.BenchOptions(tokens=10, repeats=1, ks=[1, 2], inject=[0.8, 0.5], step_repeats=1)
    report = r.report_dict({"model": "tiny", **b.bench(pair, tokenizer, [prompt()], opts, log=lambda m: None)})
    json.dumps(report)
    for key in ("mlx_lm_tokens_per_second", "plain_tokens_per_second", "acceptance_injected", "mtp"):
        assert key in report
    assert [e["num_draft_tokens"] for e in report["mtp"]] == [1, 2, "adaptive"]
    for e in report["mtp"]:
        for key in ("tokens_per_second", "speedup", "measured_over_ideal", "acceptance_per_position",
                    "acceptance_injected", "peak_memory_bytes", "cost_split", "ttft_seconds"):
            assert key in e, key
        assert e["acceptance_injected"] is True
        assert e["matches_plain"] is True
        assert e["speedup"] > 0 and e["peak_memory_bytes"] > 0
    assert "ACCEPTANCE INJECTED" in r.format_report(report)

    path = tmp_path / "bench.png"
    r.plot(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_cli_writes_json_on_a_real_shape(tmp_path, monkeypatch):
    monkeypatch.setenv(REEXEC_MARK, "1")  # never re-exec the test process
    out = tmp_path / "bench.json"
    args = ["bench", "--shape", "e2b", "--layers", "2", "--vocab", "256", "--tokens", "4", "--repeats", "1",
            "--ks", "1", "--no-adaptive", "--json", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["acceptance_injected"] is False
    assert [e["num_draft_tokens"] for e in report["mtp"]] == [1]
    assert report["mlx_lm_tokens_per_second"] > 0 and report["plain_tokens_per_second"] > 0


def test_cli_rejects_bad_arguments():
    runner = CliRunner()
    result = runner.invoke(main, ["bench"])
    assert result.exit_code != 0
    result = runner.invoke(main, ["bench", "--shape", "e2b", "--inject-acceptance", "1.5"])
    assert result.exit_code != 0


def test_real_shapes_build_valid_configs():
    from mlx_gemma_mtp.model.drafter import DrafterArgs

    for name, shape in shapes.SHAPES.items():
        args = shapes.target_args(shape, 6, 4096, experts=4)
        first_shared = args.num_hidden_layers - args.num_kv_shared_layers
        assert {"sliding_attention", "full_attention"} <= set(args.layer_types[:first_shared]), name
        draft = DrafterArgs.from_dict(shapes.drafter_config(shape, 4096))
        assert draft.backbone_hidden_size == shape.hidden
        assert draft.use_ordered_embeddings == shape.centroid_head


# --- --json and --plot are checked before the run ---------------------------------------------

# a tiny run, so that a check that wrongly passes costs seconds, not the default bench's minutes
TINY_RUN = ["--shape", "e2b", "--layers", "2", "--vocab", "256", "--tokens", "4", "--repeats", "1", "--ks", "1",
            "--no-adaptive", "--no-mlx-lm"]


def one_error_line(stderr: str, *needles):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "building" not in stderr, stderr  # nothing ran
    for needle in needles:
        assert needle in lines[0], stderr


def unwritable_outputs(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    return [
        (str(a_file / "bench.json"), "is not a folder"),
        (str(tmp_path / "missing" / "bench.json"), "does not exist"),
        (str(tmp_path / "missing" / "deeper" / "bench.json"), "does not exist"),
        ("/proc/gemma-mtp-bench.json", "/proc"),
    ]


def test_cli_checks_the_outputs_before_the_run(tmp_path):
    """Run as the installed command: one error line, a non-zero exit, nothing written or run."""
    for option in ("--json", "--plot"):
        for path, cause in unwritable_outputs(tmp_path):
            before = sorted(tmp_path.rglob("*"))
            result = subprocess.run([GEMMA_MTP, "bench", *TINY_RUN, option, path], capture_output=True, text=True,
                                    timeout=120, env={**os.environ, REEXEC_MARK: "1"})
            assert result.returncode != 0, (option, path, result.stderr)
            one_error_line(result.stderr, option, path, cause)
            assert result.stdout == ""
            assert sorted(tmp_path.rglob("*")) == before  # no file, no folder
            assert not Path(path).exists()
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


def test_check_output_names_the_cause(tmp_path, monkeypatch):
    r.check_output(str(tmp_path / "new.json"), "--json")  # a new file in a writable folder
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    r.check_output(str(existing), "--json")  # replaced
    with pytest.raises(MTPError, match="it is a folder"):
        r.check_output(str(tmp_path), "--json")
    with pytest.raises(MTPError, match="/sys"):
        r.check_output("/sys/gemma-mtp.json", "--json")
    # root may write anywhere: an unwritable folder and file as os.access reports them
    monkeypatch.setattr(r.os, "access", lambda path, mode: False)
    with pytest.raises(MTPError, match=f"folder '{tmp_path}' is not writable"):
        r.check_output(str(tmp_path / "new.json"), "--plot")
    with pytest.raises(MTPError, match="the file is not writable"):
        r.check_output(str(existing), "--plot")


def test_plot_without_matplotlib_fails_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setenv(REEXEC_MARK, "1")
    out = tmp_path / "bench.png"
    result = CliRunner().invoke(main, ["bench", *TINY_RUN, "--plot", str(out)])
    assert result.exit_code != 0
    one_error_line(result.stderr, "--plot needs matplotlib")
    assert result.stdout == "" and not out.exists()


def test_rotated_puts_every_job_in_every_place():
    jobs = ["plain", "K=1", "adaptive"]
    orders = [b.rotated(jobs, rep) for rep in range(6)]
    assert orders[1] == ["K=1", "adaptive", "plain"]
    for place in range(len(jobs)):  # over len(jobs) repeats each job runs once in each place
        assert sorted(order[place] for order in orders[:3]) == sorted(jobs)
    assert orders[3:] == orders[:3] and jobs == ["plain", "K=1", "adaptive"]


def test_batch_report_rotates_prompts_and_has_both_ideals(tiny_pair):
    pair, _ = tiny_pair
    prompts = [prompt(10 + i, seed=i) for i in range(3)]
    opts = b.BenchOptions(tokens=10, repeats=2, ks=[1], inject=[0.8, 0.5], step_repeats=1)
    report = b.bench_batches(pair, prompts, opts, [2], log=lambda m: None)
    entry = report["batches"][0]
    # each repeat takes the next two prompts, wrapping around
    assert entry["prompts_per_repeat"] == [[0, 1], [2, 0]]
    steps = entry["step_seconds"]
    assert steps["plain_queued"] > 0 and set(steps["verify_k_plus_1_queued"]) == set(steps["draft_block_k_queued"])
    for name in ("1", "adaptive"):
        e = entry["settings"][name]
        assert e["matches_plain"] is True, name  # every row of every repeat equals its own plain run
        assert e["queued_ideal_over_batched_plain"] > 0
        assert e["measured_over_queued_ideal"] == pytest.approx(
            e["over_batched_plain"] / e["queued_ideal_over_batched_plain"])
    text = b.format_batches({"model": "tiny", **report})
    assert "meas/queued ideal" in text and "\n2 | adaptive | " in text
