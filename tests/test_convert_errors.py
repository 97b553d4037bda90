"""Bad input to the converter: one clear line, a non-zero exit, nothing written."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_gemma_mtp.convert as convert_module
from mlx_gemma_mtp.convert import QuantSpec, convert, quant_spec
from mlx_gemma_mtp.errors import MTPError

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")


@pytest.fixture
def pair(reference_pair, tmp_path):
    """A private, writable copy of the e2b pair: (target_dir, draft_dir)."""
    target, draft = reference_pair("e2b")
    return shutil.copytree(target, tmp_path / "target"), shutil.copytree(draft, tmp_path / "draft")


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def run_cli(*args, env=None):
    return subprocess.run([GEMMA_MTP, *args], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def expect_error(out, *fragments, **kwargs):
    with pytest.raises(MTPError) as info:
        convert(out=out, progress=False, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert_nothing_written(out)


def test_missing_target(tmp_path):
    expect_error(tmp_path / "out", "neither a folder nor", target=str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "out", "no config.json", target=str(tmp_path / "empty"))


def test_config_not_json(pair, tmp_path):
    target, _ = pair
    (target / "config.json").write_text("{not json")
    expect_error(tmp_path / "out", "not valid JSON", target=str(target))


def test_unsupported_target_model_type(pair, tmp_path):
    target, _ = pair
    edit_config(target, lambda c: c.update(model_type="llama"))
    expect_error(tmp_path / "out", "unsupported target model type 'llama'", target=str(target))


def test_unsupported_drafter_model_type(pair, tmp_path):
    target, draft = pair
    edit_config(draft, lambda c: c.update(model_type="gemma3"))
    expect_error(tmp_path / "out", "unsupported drafter model type", target=str(target), draft=str(draft))


def test_truncated_shard(pair, tmp_path):
    target, _ = pair
    shard = sorted(target.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "out", "truncated or corrupt", shard.name, target=str(target))


def test_garbage_shard(pair, tmp_path):
    target, _ = pair
    shard = sorted(target.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    expect_error(tmp_path / "out", "corrupt", target=str(target))


def test_missing_shard(pair, tmp_path):
    target, _ = pair
    shard = sorted(target.glob("model-*.safetensors"))[0]
    shard.unlink()
    expect_error(tmp_path / "out", "missing", shard.name, target=str(target))


def test_missing_tokenizer(pair, tmp_path):
    target, _ = pair
    (target / "tokenizer.json").unlink()
    expect_error(tmp_path / "out", "no tokenizer", target=str(target))


def test_drafter_for_another_hidden_size(pair, tmp_path):
    target, draft = pair
    edit_config(draft, lambda c: c.update(backbone_hidden_size=128))
    expect_error(tmp_path / "out", "incompatible pair", "128", target=str(target), draft=str(draft))


def test_drafter_with_another_vocabulary(pair, tmp_path):
    target, draft = pair
    edit_config(draft, lambda c: c["text_config"].update(vocab_size=1024))
    expect_error(tmp_path / "out", "incompatible pair", "vocabulary", target=str(target), draft=str(draft))


def test_drafter_of_another_family(reference_pair, tmp_path):
    target, _ = reference_pair("31b")
    _, draft = reference_pair("12b")
    expect_error(tmp_path / "out", "incompatible pair", target=str(target), draft=str(draft))


def test_drafter_reading_other_kv_shapes(pair, tmp_path):
    target, draft = pair
    edit_config(draft, lambda c: c["text_config"].update(head_dim=16))
    expect_error(tmp_path / "out", "incompatible pair", "sliding_attention", target=str(target), draft=str(draft))


def test_drafter_missing_a_tensor_fails_before_writing(pair, tmp_path):
    import mlx.core as mx

    target, draft = pair
    files = sorted(draft.glob("*.safetensors"))
    weights = mx.load(str(files[0]))
    weights.pop(next(k for k in weights if k.endswith("post_projection.weight")))
    mx.save_safetensors(str(files[0]), weights)
    expect_error(tmp_path / "out", "post_projection", target=str(target), draft=str(draft))


def test_target_missing_a_tensor_fails_before_writing(pair, tmp_path):
    import mlx.core as mx

    target, _ = pair
    index = json.loads((target / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if k.endswith("layers.0.self_attn.q_proj.weight"))
    shard = target / index["weight_map"][name]
    weights = mx.load(str(shard))
    weights.pop(name)
    mx.save_safetensors(str(shard), weights)
    expect_error(tmp_path / "out", "do not match", target=str(target))


def test_existing_output_needs_force(reference_pair, tmp_path):
    target, draft = reference_pair("e2b")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MTPError, match="already exists"):
        convert(str(target), out, draft=str(draft), progress=False)
    assert (out / "keep.txt").read_text() == "mine"

    convert(str(target), out, draft=str(draft), force=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert (out / "target" / "config.json").is_file() and (out / "draft" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_while_writing_leaves_nothing(reference_pair, tmp_path, monkeypatch):
    target, draft = reference_pair("e2b")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "save_drafter", broken_save)
    out = tmp_path / "out"
    with pytest.raises(MTPError, match=f"cannot write '{out}': disk full"):
        convert(str(target), out, draft=str(draft), progress=False)
    assert_nothing_written(out)


def test_failure_while_replacing_keeps_the_old_output(reference_pair, tmp_path, monkeypatch):
    target, _ = reference_pair("e2b")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "save_target", broken_save)
    with pytest.raises(MTPError, match="disk full"):
        convert(str(target), out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    "bits, group, mode, message",
    [(7, 64, "affine", "7"), (4, 48, "affine", "48"), (8, 32, "mxfp4", "mxfp4"), (4, 64, "nvfp9", "unknown")],
)
def test_bad_quantization_values(bits, group, mode, message):
    with pytest.raises(MTPError, match=message):
        quant_spec(bits, group, mode)


def test_good_quantization_defaults():
    assert quant_spec(None, None, "affine") == QuantSpec(4, 64, "affine")
    assert quant_spec(None, None, "mxfp4") == QuantSpec(4, 32, "mxfp4")
    assert quant_spec(8, None, "affine") == QuantSpec(8, 64, "affine")


def test_unknown_dtype(reference_pair, tmp_path):
    target, _ = reference_pair("e2b")
    expect_error(tmp_path / "out", "unknown dtype", target=str(target), dtype="float64")


# The installed command, in a subprocess.


def test_cli_converts(reference_pair, tmp_path):
    target, draft = reference_pair("e4b")
    result = run_cli("convert", "--target", str(target), "--draft", str(draft), "--out", str(tmp_path / "p"), "-q")
    assert result.returncode == 0, result.stderr
    assert "bits/weight" in result.stdout
    assert "converting target" in result.stderr  # the progress bar
    manifest = json.loads((tmp_path / "p" / "mtp.json").read_text())
    assert manifest["target"]["quantization"]["bits"] == 4


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--q-bits", "7", "-q"], ["7"]),
        (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], ["mxfp4"]),
        (["--q-bits", "8"], ["-q/--quantize"]),
        (["--draft-q-bits", "lots"], ["lots"]),
        (["--dtype", "float64"], ["float64"]),
    ],
)
def test_cli_bad_flags(args, fragments, reference_pair, tmp_path):
    target, draft = reference_pair("e2b")
    out = tmp_path / "out"
    result = run_cli("convert", "--target", str(target), "--draft", str(draft), "--out", str(out), *args)
    assert_one_line_error(result, *fragments)
    assert_nothing_written(out)


def test_cli_incompatible_pair(reference_pair, tmp_path):
    target, _ = reference_pair("31b")
    _, draft = reference_pair("12b")
    out = tmp_path / "out"
    result = run_cli("convert", "--target", str(target), "--draft", str(draft), "--out", str(out))
    assert_one_line_error(result, "incompatible pair")
    assert_nothing_written(out)


def test_cli_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "convert", "--target", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_cli_existing_output(reference_pair, tmp_path):
    target, _ = reference_pair("e2b")
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_cli("convert", "--target", str(target), "--out", str(tmp_path / "out")), "--force")


# Hub ids: offline, a repo not in the cache is a clear error; one in the cache converts.


def hub_env(cache):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env.pop("HF_TOKEN", None)
    return env


def test_cli_uncached_hub_repo_offline(tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", "--target", "google/gemma-4-E2B-it", "--out", str(out), env=hub_env(tmp_path / "hub"))
    assert_one_line_error(result, "google/gemma-4-E2B-it", "cache")
    assert_nothing_written(out)


def place_in_hub_cache(cache, repo_id, folder):
    """Lay a folder out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_cli_cached_hub_repos_convert_offline(reference_pair, tmp_path):
    target, draft = reference_pair("e2b")
    cache = tmp_path / "hub"
    place_in_hub_cache(cache, "google/gemma-4-E2B-it", target)
    place_in_hub_cache(cache, "google/gemma-4-E2B-it-assistant", draft)
    out = tmp_path / "out"
    result = run_cli(
        "convert",
        "--target",
        "google/gemma-4-E2B-it",
        "--draft",
        "google/gemma-4-E2B-it-assistant",
        "--out",
        str(out),
        env=hub_env(cache),
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "mtp.json").read_text())
    assert manifest["target"]["source"] == "google/gemma-4-E2B-it"
    assert manifest["draft"]["source"] == "google/gemma-4-E2B-it-assistant"


# Output paths that cannot be written: one line naming the path given and the cause.


def invoke(*args):
    """The CLI in this process (so a test can inject a failure): (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from mlx_gemma_mtp.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_error_line(code, stderr, *fragments):
    assert code != 0
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and ".partial" not in stderr and "unexpected" not in stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/somewhere/.out.x.partial/model.safetensors")


def test_cli_full_disk(reference_pair, tmp_path, monkeypatch):
    import mlx.core as mx

    target, draft = reference_pair("e2b")
    out = tmp_path / "out"
    monkeypatch.setattr(mx, "save_safetensors", enospc)  # the first weight file written
    code, _, stderr = invoke("convert", "--target", target, "--draft", draft, "--out", out)
    assert_one_error_line(code, stderr, f"'{out}'", "no space left on device")
    assert_nothing_written(out)


def test_cli_read_only_folder(reference_pair, tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):  # what mkdtemp meets in a read-only folder (chmod binds no root)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".out.x.partial"))

    target, _ = reference_pair("e2b")
    out = tmp_path / "out"
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code, _, stderr = invoke("convert", "--target", target, "--out", out)
    assert_one_error_line(code, stderr, f"'{out}'", "read-only file system")
    assert_nothing_written(out)


@pytest.mark.parametrize("where", ["proc", "under_a_file", "deep_under_a_file"])
def test_cli_unwritable_output(where, reference_pair, tmp_path):
    target, _ = reference_pair("e2b")
    (tmp_path / "file").write_text("x")
    out = {
        "proc": Path("/proc/gemma-mtp-out"),
        "under_a_file": tmp_path / "file" / "out",
        "deep_under_a_file": tmp_path / "file" / "a" / "out",
    }[where]
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("convert", "--target", str(target), "--out", str(out))
    assert_one_line_error(result, f"'{out}'")
    assert "file, not a folder" in result.stderr if where != "proc" else "does not allow new folders" in result.stderr
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()


def test_new_parent_folders_go_when_writing_fails(reference_pair, tmp_path, monkeypatch):
    target, _ = reference_pair("e2b")
    out = tmp_path / "new" / "deeper" / "out"
    monkeypatch.setattr(convert_module, "save_target", enospc)
    with pytest.raises(MTPError, match="no space left on device"):
        convert(str(target), out, progress=False)
    assert list(tmp_path.iterdir()) == []
