"""Images in: the Pillow processor against transformers' Gemma 4 image processor, the MLX vision
encoders against `get_image_features` of the transformers reference (every miniature with vision),
loading from Google's, mlx-community's and our own converted layouts, and bad images."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import reference_models as rm
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.vision import (
    ImageTokenIds,
    PatchGeometry,
    expand_image_placeholders,
    expand_image_text,
    image_token_ids,
    load_image,
    load_vision,
    num_soft_tokens,
    prepare,
)
from mlx_gemma_mtp.vision.resample import resize_bicubic

TOWERS = ("e2b", "e4b", "26b", "31b")
BUDGETS = (70, 140)
# (width, height): landscape, portrait, and a 10:1 strip
ENCODE_SIZES = ((300, 200), (200, 300), (1000, 100))
# and for the pixels also a square, a strip one soft token high, and an image smaller than a patch
PIXEL_SIZES = ENCODE_SIZES + ((256, 256), (2000, 12), (5, 7))
ATOL = 1e-4  # float32 soft tokens vs the reference; measured 1e-5 or better (see test ids)

REAL_TOWER = PatchGeometry(16, 3)
REAL_12B = PatchGeometry(16, 3, merged=True)


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rs = np.random.RandomState(seed + width * 7 + height)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = (rs.rand(height, width, channels) * 255).astype(np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --- the reference -----------------------------------------------------------------------------


def reference_processor(geometry: PatchGeometry, budget: int):
    """transformers' image processor for `geometry`: the towers' Pillow backend, the 12B's
    torchvision one."""
    return rm.image_processor(geometry.patch_size, geometry.pooling_kernel_size, budget, unified=geometry.merged)


@pytest.fixture(scope="module")
def target(reference_pair):
    return lambda variant: reference_pair(variant)[0]


@pytest.fixture(scope="module")
def reference_model(target):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = rm.load_reference_target(target(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def vision(target):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = load_vision(target(variant))
        return cache[variant]

    return get


def reference_soft_tokens(model, geometry, images, budget) -> list[np.ndarray]:
    batch = reference_processor(geometry, budget)(images, return_tensors="pt")
    with torch.no_grad():
        out = model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
    return [t.numpy() for t in out.pooler_output]


# --- the processor -----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", (70, 280))
@pytest.mark.parametrize(
    "geometry",
    [REAL_TOWER, REAL_12B, PatchGeometry(4, 3), PatchGeometry(2, 3, merged=True)],
    ids=["tower", "12b", "mini-tower", "mini-12b"],
)
def test_pixels_equal_reference_processor(geometry, budget):
    images = [noise_image(w, h) for w, h in PIXEL_SIZES]
    ref = reference_processor(geometry, budget)(images, return_tensors="np")
    for i, img in enumerate(images):
        ours = prepare(img, budget, geometry)
        n = ours.pixel_values.shape[0]
        assert ours.num_soft_tokens == ref["num_soft_tokens_per_image"][i] <= budget
        assert ours.num_soft_tokens == num_soft_tokens(img.height, img.width, budget, geometry)
        assert ours.pixel_values.dtype == np.float32
        # bit-identical: the same resize arithmetic and the same rescale
        assert np.array_equal(ours.pixel_values, ref["pixel_values"][i, :n])
        assert np.array_equal(ours.positions, ref["image_position_ids"][i, :n])
        assert (ref["image_position_ids"][i, n:] == -1).all()  # the rest is the reference's padding


@pytest.mark.parametrize("geometry", [REAL_TOWER, REAL_12B], ids=["tower", "12b"])
@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_modes_convert_as_the_reference(mode, geometry):
    img = noise_image(120, 90, mode="RGBA" if mode != "L" else "L")
    if mode == "P":
        img = img.convert("RGB").convert("P")
        img.info["transparency"] = 3  # one transparent palette entry: composited onto white
    ref = reference_processor(geometry, 70)([img], return_tensors="np")
    ours = prepare(img, 70, geometry)
    assert np.array_equal(ours.pixel_values, ref["pixel_values"][0, : ours.pixel_values.shape[0]])


def test_fixed_point_resize_equals_torchs():
    """The 12B's resize against torch's uint8 antialiased bicubic (what torchvision's `resize`
    runs): shrinking and growing each side, mixed, by factors up to 40, thin strips, one pixel."""
    rs = np.random.RandomState(3)
    shapes = [((300, 200), (144, 240)), ((1000, 100), (96, 1248)), ((2000, 12), (48, 3360)), ((1, 1), (5, 3)),
              ((4000, 30), (100, 48))]
    shapes += [((rs.randint(1, 700), rs.randint(1, 700)), (rs.randint(1, 900), rs.randint(1, 900))) for _ in range(40)]
    for (w, h), (new_h, new_w) in shapes:
        pixels = np.asarray(noise_image(w, h))
        expected = torch.nn.functional.interpolate(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None],
                                                   size=(new_h, new_w), mode="bicubic", antialias=True)
        assert np.array_equal(resize_bicubic(pixels, new_h, new_w), expected[0].permute(1, 2, 0).numpy()), (w, h)


def test_bytes_path_and_exif_orientation(tmp_path):
    img = noise_image(64, 32)
    path = tmp_path / "x.png"
    img.save(path)
    from_pil, from_bytes, from_path = prepare(img, 70), prepare(png_bytes(img), 70), prepare(path, 70)
    assert np.array_equal(from_pil.pixel_values, from_bytes.pixel_values)
    assert np.array_equal(from_pil.pixel_values, from_path.pixel_values)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (32, 64)


def test_budget_must_be_a_supported_one():
    with pytest.raises(MTPError, match="max_soft_tokens must be one of 70, 140, 280, 560, 1120"):
        prepare(noise_image(10, 10), 100)


# --- bad images --------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_images(tmp_path):
    good = png_bytes(noise_image(64, 64))
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    ppm = tmp_path / "x.ppm"
    noise_image(8, 8).save(ppm)  # a real image format, outside the allowed ones
    return {
        "random bytes": (np.random.RandomState(0).bytes(512), "not an image in a supported format"),
        "empty": (b"", "image data is empty"),
        "corrupt png": (good[:40] + b"\x00" * 200, "corrupt"),
        "truncated png": (good[: len(good) // 2], "truncated or corrupt"),
        "text file": (text, "not an image in a supported format"),
        "ppm": (ppm, "not an image in a supported format"),
        "bomb 100000x100000": (png_header_only(100_000, 100_000), "too large"),
        "over our limit": (png_header_only(9000, 9000), "too large: 9000x9000"),
        "missing file": (tmp_path / "nope.png", "does not exist"),
        "folder": (tmp_path, "is a folder"),
        "wrong type": (12345, "must be bytes, a file path or a PIL image"),
    }


def test_bad_images_are_one_line_errors(tmp_path):
    for name, (image, fragment) in bad_images(tmp_path).items():
        with pytest.raises(MTPError) as info:
            prepare(image, 70)
        message = str(info.value)
        assert fragment in message and "\n" not in message, (name, message)


# --- the prompt --------------------------------------------------------------------------------


def test_prompt_ids_come_from_the_config(target, vision):
    config = json.loads((target("e2b") / "config.json").read_text())
    ids = ImageTokenIds.from_config(config)
    assert (ids.boi, ids.image, ids.eoi) == (config["boi_token_id"], config["image_token_id"], config["eoi_token_id"])
    image = vision("e2b").prepare(noise_image(300, 200), 70)
    assert vision("e2b").prompt_ids(image) == [ids.boi] + [ids.image] * image.num_soft_tokens + [ids.eoi]
    assert image_token_ids(2, ImageTokenIds(image=9, boi=8, eoi=7)) == [8, 9, 9, 7]
    small = ImageTokenIds(image=9, boi=8, eoi=7)
    assert expand_image_placeholders([1, 9, 2, 9], [2, 1], small) == [1, 8, 9, 9, 7, 2, 8, 9, 7]
    with pytest.raises(MTPError, match="2 image placeholders for 1 images"):
        expand_image_placeholders([9, 9], [3], small)
    text = expand_image_text("a <|image|> b", [3], "<|image|>", "<|image>", "<image|>")
    assert text == "a <|image><|image|><|image|><|image|><image|> b"


# --- the encoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("variant", TOWERS + ("12b",))
def test_soft_tokens_match_get_image_features(variant, budget, vision, reference_model):
    model = vision(variant)
    images = [noise_image(w, h) for w, h in ENCODE_SIZES]
    expected = reference_soft_tokens(reference_model(variant), model.geometry, images, budget)
    prepared = [model.prepare(img, budget) for img in images]
    got = model.encode(prepared)
    for image, ours, ref in zip(prepared, got, expected):
        assert ours.shape == ref.shape == (image.num_soft_tokens, rm.HIDDEN)
        assert ours.dtype == mx.float32
        np.testing.assert_allclose(np.array(ours), ref, atol=ATOL, rtol=0)


def test_attention_in_query_chunks_is_the_same(vision, monkeypatch):
    import mlx_gemma_mtp.vision.encoder as encoder

    image = vision("26b").prepare(noise_image(300, 200), 140)  # 1260 patches
    [whole] = vision("26b").encode([image])
    monkeypatch.setattr(encoder, "QUERY_CHUNK", 500)
    [chunked] = vision("26b").encode([image])
    np.testing.assert_allclose(np.array(chunked), np.array(whole), atol=1e-6, rtol=0)


def test_encode_refuses_an_image_prepared_for_another_model(vision):
    image = vision("e2b").prepare(noise_image(300, 200), 70)
    with pytest.raises(MTPError, match="prepare it with this model's prepare"):
        vision("12b").encode([image])


def test_no_vision_is_none_and_wrong_weights_an_error(target, tmp_path):
    config = json.loads((target("e2b") / "config.json").read_text())
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    mx.save_safetensors(str(text_only / "model.safetensors"), {"language_model.model.norm.weight": mx.ones((4,))})
    (text_only / "config.json").write_text(json.dumps(config))
    assert load_vision(text_only) is None  # vision_config, no vision weights (mlx-lm's conversions)
    (text_only / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "vision_config"}))
    assert load_vision(text_only) is None

    broken = tmp_path / "broken"
    broken.mkdir()
    weights = {k: v for k, v in rm_tensors(target("e2b")).items() if "vision" in k}
    weights.pop("model.vision_tower.encoder.layers.1.mlp.up_proj.linear.weight")
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(MTPError, match="do not match its vision_config"):
        load_vision(broken)


def rm_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# --- other layouts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(target, tmp_path_factory):
    """Our pair conversion of the target alone, text quantized to 4 bits."""
    from mlx_gemma_mtp.convert import QuantSpec, convert

    cache = {}

    def get(variant):
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"vision-pair-{variant}") / "pair"
            convert(str(target(variant)), out, quantization=QuantSpec(4, 64, "affine"), dtype="float32", progress=False)
            cache[variant] = out / "target"
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["e2b", "12b"])
def test_converted_pair_and_mlx_community_folders_load(variant, target, vision, converted, tmp_path):
    images = [vision(variant).prepare(noise_image(w, h), 70) for w, h in ENCODE_SIZES]
    google = vision(variant).encode(images)
    pair_target = converted(variant)
    assert "vision_config" in json.loads((pair_target / "config.json").read_text())
    community = rm.write_mlx_community_target(pair_target, target(variant), tmp_path / "community")
    for folder in (pair_target, community):
        for ours, ref in zip(load_vision(folder).encode(images), google):
            np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["e2b", "12b"])
def test_quantized_vision_loads_and_runs(variant, target, vision, converted, tmp_path):
    community = rm.write_mlx_community_target(converted(variant), target(variant), tmp_path / "q", vision_bits=4)
    quantized = load_vision(community)
    layers = [p for p, m in quantized.module.named_modules() if type(m).__name__ == "QuantizedLinear"]
    assert layers and quantized.nbytes < vision(variant).nbytes
    # the same model with the quantized weights dequantized into a float copy
    stored = mx.load(str(community / "model.safetensors"))
    dequantized = load_vision(target(variant))
    dequantized.module.load_weights([
        (f"{p}.weight", mx.dequantize(stored[f"{p}.weight"], stored[f"{p}.scales"], stored[f"{p}.biases"], 32, 4))
        for p in layers
    ], strict=False)
    images = [quantized.prepare(noise_image(w, h), 70) for w, h in ENCODE_SIZES]
    for q, d, f in zip(quantized.encode(images), dequantized.encode(images), vision(variant).encode(images)):
        np.testing.assert_allclose(np.array(q), np.array(d), atol=1e-4, rtol=0)
        # 4 bits on random weights: about 0.3 relative RMS against the float model (measured 0.1-0.3)
        assert float(mx.sqrt(((q - f) ** 2).mean() / (f**2).mean())) < 0.5


def test_converter_quantizes_embed_vision_and_keeps_the_tower(target, vision, tmp_path):
    from mlx_gemma_mtp.convert import convert, quant_spec

    # mxfp4's groups of 32 fit the miniature's 32-wide embed_vision (affine's 64 do not)
    convert(str(target("e2b")), tmp_path / "p", quantization=quant_spec(None, None, "mxfp4"), progress=False)
    quantized = load_vision(tmp_path / "p" / "target")
    layers = [p for p, m in quantized.module.named_modules() if type(m).__name__ == "QuantizedLinear"]
    assert layers == ["embed_vision.embedding_projection"]
    images = [quantized.prepare(noise_image(w, h), 70) for w, h in ENCODE_SIZES]
    for q, f in zip(quantized.encode(images), vision("e2b").encode(images)):
        assert float(mx.sqrt(((q - f) ** 2).mean() / (f**2).mean())) < 0.5


def test_text_only_use_does_not_load_vision():
    code = (
        "import sys, mlx_gemma_mtp.vision\n"
        "assert not any(m == 'PIL' or m.startswith('mlx.') for m in sys.modules), 'vision import is not lazy'\n"
        "import mlx_gemma_mtp.model.loading, mlx_gemma_mtp.api\n"
        "assert 'mlx_gemma_mtp.vision.model' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
