"""`gemma-mtp train-drafter`, run as the installed command on a miniature target."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma_mtp.model import demo
from mlx_gemma_mtp.convert import convert

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")
SMALL = ["--steps", "3", "--batch", "2", "--seq-len", "32", "--block", "2", "--eval-every", "2",
         "--layers", "1", "--hidden", "64", "--intermediate", "64"]


@pytest.fixture(scope="module")
def target(reference_pair, tmp_path_factory):
    hf_target, hf_draft = reference_pair("31b")
    out = tmp_path_factory.mktemp("train-cli") / "31b"
    convert(str(hf_target), out, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    for path in demo.stdlib_files()[:6]:
        (folder / path.name).write_text(demo.read_text(path))
    return folder


def run(*args):
    return subprocess.run([GEMMA_MTP, "train-drafter", *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") or "Error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_trains_and_writes_a_google_layout_drafter(target, data, tmp_path):
    out = tmp_path / "drafter"
    result = run("--target", target, "--data", data, "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr
    assert "held-out greedy acceptance per draft position: before [" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["backbone_hidden_size"] == 64
    assert config["text_config"]["num_hidden_layers"] == 1
    record = json.loads((out / "training.json").read_text())
    assert len(record["held_out_acceptance_after"]) == 2 and record["config"]["steps"] == 3
    # it pairs with its target in the runtime
    loaded = subprocess.run([GEMMA_MTP, "generate", "--model", target, "--draft-model", out, "--raw",
                             "--prompt", "def f(x):", "--max-tokens", "8", "--num-draft-tokens", "2"],
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr


def test_bad_input_is_one_line(target, data, tmp_path, reference_pair):
    one_line_error(run("--target", target, "--data", tmp_path / "nope", "--out", tmp_path / "o", *SMALL),
                   "does not exist")
    existing = tmp_path / "existing"
    existing.mkdir()
    one_line_error(run("--target", target, "--data", data, "--out", existing, *SMALL), "already exists")
    _, e2b_draft = reference_pair("e2b")
    one_line_error(run("--target", target, "--init", e2b_draft, "--data", data, "--out", tmp_path / "o",
                       "--steps", "2", "--seq-len", "32"), "incompatible pair")
    one_line_error(run("--target", target, "--init", e2b_draft, "--data", data, "--out", tmp_path / "o",
                       "--layers", "2"), "--init")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))


# Output paths that cannot be written: one `error:` line naming the path given, nothing left behind.


def assert_one_error_line(code, stderr, *fragments):
    assert code != 0
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and ".partial" not in stderr and "unexpected" not in stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_output_fails_before_training(where, target, data, tmp_path):
    (tmp_path / "file").write_text("x")
    out = Path("/proc/gemma-mtp-drafter") if where == "proc" else tmp_path / "file" / "drafter"
    result = run("--target", target, "--data", data, "--out", out, *SMALL)
    assert_one_error_line(result.returncode, result.stderr, f"'{out}'")
    assert "train-drafter:" not in result.stderr  # no progress bar: it failed before training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and not out.exists()


def test_full_disk_while_writing(target, data, tmp_path, monkeypatch):
    import errno
    import os

    import mlx.core as mx
    from click.testing import CliRunner

    from mlx_gemma_mtp.cli import main

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(mx, "save_safetensors", enospc)
    out = tmp_path / "new" / "drafter"
    result = CliRunner().invoke(main, ["train-drafter", "--target", str(target), "--data", str(data),
                                       "--out", str(out), *SMALL])
    assert_one_error_line(result.exit_code, result.stderr, f"'{out}'", "no space left on device")
    assert list(tmp_path.iterdir()) == []
