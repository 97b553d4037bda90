"""Loading pairs and reading the on-disk format: bad input is one MTPError line naming the file,
and draft=False / --no-draft never touches the drafter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma_mtp.model import checkpoint
from mlx_gemma_mtp.model import demo
from mlx_gemma_mtp import load
from mlx_gemma_mtp.model.config import normalize_draft_config, normalize_target_config
from mlx_gemma_mtp.errors import MTPError

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")


@pytest.fixture
def pair(tmp_path):
    """A private copy of the demo pair (small, real, offline)."""
    return shutil.copytree(demo.PAIR_DIR, tmp_path / "pair")


def one_line_error(fragments, call, *args, **kwargs):
    with pytest.raises(MTPError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_manifest(folder: Path, change) -> Path:
    path = folder / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


# --- the manifest ------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    target = {"path": "target", "source": "google/gemma-4-E2B-it", "model_type": "gemma4", "dtype": "bfloat16",
              "quantization": None, "bits_per_weight": 16.0}
    written = checkpoint.write_manifest(tmp_path, "mlx-gemma-mtp test", target, None)
    assert checkpoint.read_manifest(tmp_path) == written
    assert written["format"] == checkpoint.FORMAT and written["draft"] is None


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m["target"].pop("path"), "'target.path' is missing"),
    (lambda m: m.update(target="target"), "'target' must be an object"),
    (lambda m: m.pop("target"), "'target' must be an object"),
    (lambda m: m["target"].update(path=3), "'target.path' has the wrong type"),
    (lambda m: m["draft"].update(path=["draft"]), "'draft.path' has the wrong type"),
    (lambda m: m["target"].update(bits_per_weight="16"), "'target.bits_per_weight' has the wrong type"),
    (lambda m: m["draft"].update(quantization=4), "'draft.quantization' has the wrong type"),
    (lambda m: m.update(draft="draft"), "'draft' must be an object"),
    (lambda m: m["target"].update(path="/etc"), "must be a folder inside the pair"),
    (lambda m: m["draft"].update(path="../elsewhere"), "must be a folder inside the pair"),
])
def test_bad_manifest(pair, change, fragment):
    path = edit_manifest(pair, change)
    one_line_error([str(path), fragment], checkpoint.read_manifest, pair)
    one_line_error([str(path), fragment], load, str(pair))
    one_line_error([str(path)], load, str(pair), draft=False)


@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                            (b"\xff\xfe", "not valid JSON")])
def test_manifest_not_json(pair, text, fragment):
    path = pair / checkpoint.MANIFEST
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error([str(path), fragment], load, str(pair))


def test_source_record_keeps_no_absolute_path(tmp_path):
    assert checkpoint.source_record("google/gemma-4-E2B-it") == "google/gemma-4-E2B-it"
    (tmp_path / "my-model").mkdir()
    assert checkpoint.source_record(str(tmp_path / "my-model")) == "my-model"
    assert checkpoint.source_record(tmp_path / "my-model" / ".") == "my-model"


# --- load ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, 123, "", "   ", ["a"]])
def test_load_refuses_what_is_not_a_path(path):
    one_line_error(["model must be a folder or a Hugging Face repo id"], load, path)


def test_load_refuses_a_drafter_with_draft_false(pair):
    one_line_error(["draft=False"], load, str(pair), draft_path=str(pair / "draft"), draft=False)


def test_pair_keeps_its_normalized_configs(pair):
    loaded, _ = load(pair)  # a Path is fine too
    raw_target = json.loads((pair / "target" / "config.json").read_text())
    raw_draft = json.loads((pair / "draft" / "config.json").read_text())
    assert loaded.target_config == normalize_target_config(raw_target)
    assert loaded.draft_config == normalize_draft_config(raw_draft)
    assert loaded.drafter is not None


def test_draft_false_never_reads_the_drafter(pair):
    truncate(pair / "draft" / "model.safetensors")
    (pair / "draft" / "config.json").write_text("{not json")
    loaded, tokenizer = load(str(pair), draft=False)
    assert loaded.drafter is None and loaded.draft_config is None
    assert loaded.target_config["model_type"] == "gemma4_text"
    shutil.rmtree(pair / "draft")
    assert load(str(pair), draft=False)[0].drafter is None
    one_line_error(["drafter", "config.json"], load, str(pair))  # with the drafter: a clean error


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("part", ["target", "draft"])
def test_damaged_safetensors(pair, part, damage):
    weights = pair / part / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    else:
        weights.write_bytes(b"\xff" * 64)
    one_line_error([str(weights), "corrupt"], load, str(pair))


def test_damaged_shard_outside_the_index(pair):
    # mlx-lm reads every model*.safetensors, listed in the index or not
    stray = pair / "target" / "model-extra.safetensors"
    stray.write_bytes((pair / "target" / "model.safetensors").read_bytes()[:1000])
    one_line_error([str(stray), "corrupt"], load, str(pair), draft=False)


def test_missing_target_config(pair):
    (pair / "target" / "config.json").unlink()
    one_line_error(["no config.json"], load, str(pair))


# --- hub ids: only the parts needed are downloaded ---------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Every snapshot_download answered from a local folder; the patterns asked for are recorded."""
    import huggingface_hub

    calls, repos = [], {}

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, repos


def test_hub_pair_without_draft_downloads_no_drafter(pair, fake_hub):
    calls, repos = fake_hub
    repos["me/demo-mtp"] = pair
    loaded, _ = load("me/demo-mtp", draft=False)
    assert loaded.drafter is None
    assert calls[0] == [checkpoint.MANIFEST]  # the manifest alone first
    assert calls[1] and all(p.startswith("target/") for p in calls[1])

    calls.clear()
    loaded, _ = load("me/demo-mtp")
    assert loaded.drafter is not None
    assert "draft/*.safetensors" in calls[1] and "target/*.safetensors" in calls[1]


def test_hub_target_without_manifest(pair, fake_hub):
    calls, repos = fake_hub
    repos["me/target"] = pair / "target"
    loaded, _ = load("me/target")
    assert loaded.drafter is None
    assert calls == [[checkpoint.MANIFEST], checkpoint.DOWNLOAD_PATTERNS]


# --- the command line ----------------------------------------------------------------------------


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([GEMMA_MTP, *map(str, args)], capture_output=True, text=True, timeout=180, env=env)


def test_cli_no_draft_never_reads_the_drafter(pair):
    shutil.rmtree(pair / "draft")
    result = run("generate", "--model", pair, "--no-draft", "--raw", "--prompt", "def f(x):", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("part", ["manifest", "draft_weights"])
def test_cli_damaged_pair_is_one_line(pair, part):
    if part == "manifest":
        edit_manifest(pair, lambda m: m["target"].pop("path"))
        fragment = "mtp.json"
    else:
        truncate(pair / "draft" / "model.safetensors")
        fragment = "model.safetensors"
    result = run("generate", "--model", pair, "--raw", "--prompt", "def f(x):", "--max-tokens", "4")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
