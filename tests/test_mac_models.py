"""What a Mac user already holds: mlx-community conversions (made with mlx-vlm) of targets and
drafters load as they are; a known Gemma 4 target given without a drafter names the one that fits."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import reference_models
from mlx_gemma_mtp import generate, load
from mlx_gemma_mtp.model.config import suggested_drafters

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")
PROMPT = [2, 17, 300, 45, 9, 211, 77, 5]


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_mlx_community_target_and_drafter_load_as_they_are(variant, reference_pair, pair_dir, mlx_community_drafter,
                                                           tmp_path):
    hf_target, _ = reference_pair(variant)
    ours = pair_dir(variant, 4)  # our 4-bit conversion: the same text weights mlx-vlm writes
    community = reference_models.write_mlx_community_target(ours / "target", hf_target, tmp_path / "target")
    names = list(mx.load(str(community / "model.safetensors")))
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("language_model.model.") for n in names)
    drafter = mlx_community_drafter(variant, 4)
    expected_pair = load(str(ours / "target"), draft_path=str(drafter))
    pair = load(str(community), draft_path=str(drafter))
    assert pair[0].drafter is not None
    for k in (0, 3):
        expected = generate(*expected_pair, PROMPT, max_tokens=24, num_draft_tokens=k)
        assert generate(*pair, PROMPT, max_tokens=24, num_draft_tokens=k) == expected


@pytest.mark.parametrize("hidden, layers, name", [(1536, 35, "E2B"), (2560, 42, "E4B"), (3840, 48, "12B"),
                                                  (2816, 30, "26B-A4B"), (5376, 60, "31B")])
def test_known_targets_name_their_drafters(hidden, layers, name):
    config = {"model_type": "gemma4", "text_config": {"hidden_size": hidden, "num_hidden_layers": layers}}
    assert suggested_drafters(config) == [f"google/gemma-4-{name}-it-assistant",
                                          f"mlx-community/gemma-4-{name}-it-assistant-bf16"]
    assert suggested_drafters({"hidden_size": 64, "num_hidden_layers": 2}) == []


def test_a_target_without_drafter_is_not_decoded_plainly_in_silence(pair_dir, capsys):
    from mlx_gemma_mtp.cli.generate_command import say_which_drafter

    say_which_drafter("mlx-community/gemma-4-E4B-it-4bit",
                      {"text_config": {"hidden_size": 2560, "num_hidden_layers": 42}})
    err = capsys.readouterr().err
    assert "--draft-model mlx-community/gemma-4-E4B-it-assistant-bf16" in err and "google/gemma-4-E4B-it-assistant" in err
    target = pair_dir("e2b") / "target"
    out = subprocess.run([GEMMA_MTP, "generate", "--model", str(target), "--raw", "--prompt", "x", "--max-tokens", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no drafter: decoding without MTP" in out.stderr
    quiet = subprocess.run([GEMMA_MTP, "generate", "--model", str(target), "--no-draft", "--raw", "--prompt", "x",
                            "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "no drafter" not in quiet.stderr
