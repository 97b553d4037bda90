"""The converter against the transformers reference, on miniature checkpoints of all five variants."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load

import reference_models as ref
from mlx_gemma_mtp import load
from mlx_gemma_mtp.model.checkpoint import MANIFEST
from mlx_gemma_mtp.convert import QuantSpec, convert, quant_spec
from mlx_gemma_mtp.model.drafter import load_drafter

VARIANTS = ref.VARIANTS
STYLES = ("google", "per_layer")


@pytest.fixture(scope="session")
def converted(reference_pair, tmp_path_factory):
    """converted(variant, style, quantization=None) -> pair folder, converted once per session."""
    cache = {}

    def make(variant, style="google", quantization=None):
        key = (variant, style, quantization)
        if key not in cache:
            target, draft = reference_pair(variant, style)
            out = tmp_path_factory.mktemp("pairs") / f"{variant}-{style}"
            convert(str(target), out, draft=str(draft), quantization=quantization, dtype="float32", progress=False)
            cache[key] = out
        return cache[key]

    return make


def long_prompt(target_dir, seed=0):
    """Token ids longer than the variant's sliding window (and not all special)."""
    window = json.loads((target_dir / "config.json").read_text())["text_config"]["sliding_window"]
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(110, 512, size=2 * window + 5).tolist()


def reference_logits(target_dir, ids):
    """The reference's logits, computed in float64 so the comparison measures our float32 error
    alone (transformers' grouped MoE kernel has no float64: the MoE variant stays float32)."""
    model = ref.load_reference_target(target_dir)
    moe = json.loads((target_dir / "config.json").read_text())["text_config"].get("enable_moe_block")
    if not moe:
        model = model.double()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_target_logits_match_reference(variant, style, reference_pair, converted):
    target_dir, _ = reference_pair(variant, style)
    ids = long_prompt(target_dir)
    expected = reference_logits(target_dir, ids)

    model, _ = mlx_lm_load(str(converted(variant, style) / "target"))
    got = np.array(model(mx.array([ids]))[0])

    assert got.shape == expected.shape
    error = np.abs(got - expected).max()
    print(f"{variant} {style}: max |logit error| {error:.2e}")
    assert error < 1e-4

    # our runtime's loader gives the very same model
    pair, _ = load(str(converted(variant, style)))
    assert np.array_equal(np.array(pair.target(mx.array([ids]))[0]), got)


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_config_styles_convert_to_the_same_mlx_config(variant, converted):
    configs = [json.loads((converted(variant, s) / "target" / "config.json").read_text()) for s in STYLES]
    for c in configs:
        c["text_config"].pop("per_layer_config", None)
    assert configs[0]["text_config"] == configs[1]["text_config"]
    assert configs[0]["vocab_size"] == configs[0]["text_config"]["vocab_size"] == 512


def assert_same_parameters(a, b):
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].shape == pb[k].shape, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_drafter_loads_from_google_converted_and_mlx_community_layouts(variant, reference_pair, converted, tmp_path):
    _, draft_dir = reference_pair(variant)
    google, google_config = load_drafter(draft_dir)
    ours, ours_config = load_drafter(converted(variant) / "draft")
    assert_same_parameters(google, ours)
    assert ours_config["model_type"] == google_config["model_type"]

    community_dir = tmp_path / "community"
    ref.write_mlx_community_drafter(draft_dir, community_dir, bits=4)
    community, _ = load_drafter(community_dir)
    names = dict(tree_flatten(community.parameters()))
    assert "model.layers.0.self_attn.q_proj.scales" in names
    assert "model.embed_tokens.scales" in names


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_conversion_loads_and_generates(variant, bits, reference_pair, converted):
    out = converted(variant, quantization=QuantSpec(bits, 64, "affine"))
    manifest = json.loads((out / MANIFEST).read_text())
    bpw = manifest["target"]["bits_per_weight"]
    print(f"{variant} {bits}-bit target: {bpw} bits per weight")
    assert bits < bpw < 32
    assert manifest["target"]["quantization"] == {"bits": bits, "group_size": 64, "mode": "affine"}
    assert manifest["draft"]["quantization"] is None

    model, tokenizer = mlx_lm_load(str(out / "target"))
    config = json.loads((out / "target" / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    if variant == "26b":
        routers = [k for k in config["quantization"] if k.endswith("router.proj")]
        assert routers and all(config["quantization"][k]["bits"] == 8 for k in routers)

    text = mlx_lm_generate(model, tokenizer, "def main():", max_tokens=12)
    assert len(tokenizer.encode(text, add_special_tokens=False)) > 0

    # Quantized logits follow the float ones (a wrong scale or layout gives no correlation; these
    # random miniatures amplify 4-bit rounding far more than trained models do).
    target_dir, _ = reference_pair(variant)
    ids = mx.array([long_prompt(target_dir)])
    float_model, _ = mlx_lm_load(str(converted(variant) / "target"))
    a, b = np.array(model(ids)[0]).ravel(), np.array(float_model(ids)[0]).ravel()
    assert np.corrcoef(a, b)[0, 1] > (0.5 if bits == 4 else 0.9)


def test_4_bit_bits_per_weight_below_8_bit(converted):
    bpw = {
        bits: json.loads((converted("31b", quantization=QuantSpec(bits, 64, "affine")) / MANIFEST).read_text())
        for bits in (4, 8)
    }
    assert bpw[4]["target"]["bits_per_weight"] < bpw[8]["target"]["bits_per_weight"]


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8"])
def test_mx_modes_convert_and_generate(mode, reference_pair, tmp_path):
    target, draft = reference_pair("e4b")
    convert(str(target), tmp_path / "p", draft=str(draft), quantization=quant_spec(None, None, mode), progress=False)
    model, tokenizer = mlx_lm_load(str(tmp_path / "p" / "target"))
    assert mlx_lm_generate(model, tokenizer, "x = 1", max_tokens=4)


def test_quantized_drafter(reference_pair, tmp_path):
    target, draft = reference_pair("e2b")
    out = tmp_path / "p"
    convert(str(target), out, draft=str(draft), quantization=QuantSpec(4, 64, "affine"), draft_bits=8, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["draft"]["quantization"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert 8 < manifest["draft"]["bits_per_weight"] < 32
    drafter, config = load_drafter(out / "draft")
    names = dict(tree_flatten(drafter.parameters()))
    assert "pre_projection.scales" in names
    assert "masked_embedding.centroids.scales" not in names  # the centroid router stays exact
    assert config["quantization"]["bits"] == 8


def test_target_only_conversion(reference_pair, tmp_path):
    target, _ = reference_pair("31b")
    convert(str(target), tmp_path / "p", progress=False)
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert manifest["draft"] is None and not (tmp_path / "p" / "draft").exists()
    assert manifest["target"]["dtype"] == "float32"  # the checkpoint's own dtype by default


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_manifest_and_configs_say_what_was_written(dtype, reference_pair, tmp_path):
    from mlx_gemma_mtp.model.checkpoint import DTYPE_NAMES, read_manifest

    target, draft = reference_pair("e2b")  # a float32 checkpoint: bfloat16 is a cast
    out = tmp_path / "p"
    convert(str(target), out, draft=str(draft), dtype=dtype, progress=False)
    manifest = read_manifest(out)
    # a local source by its folder name only: no path of the converting machine
    assert manifest["target"]["source"] == target.name and manifest["draft"]["source"] == draft.name
    for part in ("target", "draft"):
        config = json.loads((out / part / "config.json").read_text())
        floats = {
            DTYPE_NAMES[v.dtype]
            for f in (out / part).glob("*.safetensors")
            for v in mx.load(str(f)).values()
            if mx.issubdtype(v.dtype, mx.floating)
        }
        assert floats == {dtype} and config["dtype"] == dtype and manifest[part]["dtype"] == dtype, part
