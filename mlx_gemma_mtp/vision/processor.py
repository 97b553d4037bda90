"""An image -> the patches the vision encoder takes, with Pillow and NumPy only (no OpenCV, no torch).

The steps are those of transformers' Gemma 4 image processors, and the pixels bit-identical to
theirs: the towers' Pillow backend (`Gemma4ImageProcessorPil`), and the 12B's
`Gemma4UnifiedImageProcessor`, whose only backend is torchvision (its resize is redone in
`resample.py`):

1. RGB, with any transparency composited onto white;
2. an aspect-preserving bicubic resize to the largest size whose sides are multiples of
   `patch_size * pooling_kernel_size` and whose patch count fits the soft-token budget;
3. pixels scaled to [0, 1] (no mean/std: the model itself maps them to [-1, 1]);
4. non-overlapping square patches in row-major order, each flattened (row, column, channel),
   with its (x, y) position in the patch grid.

The towers (E2B/E4B/26B/31B) embed 16-px patches and pool 3x3 groups of them into one soft token.
The 12B embeds each 3x3 group as one 48-px patch; its reference processor cuts 16-px patches and
merges each group back into that 48-px patch, which is the same as cutting 48-px patches directly.
Either way an image costs N soft tokens, N <= the budget.

Decoding refuses, with a one-line MTPError: files that are not images, formats outside
ALLOWED_FORMATS, truncated or corrupt data, and images over MAX_IMAGE_PIXELS (checked from the
header, before any pixel is decoded, so a decompression bomb costs nothing).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.vision.resample import resize_bicubic

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280  # the reference processor's default
MAX_IMAGE_PIXELS = 8192 * 8192  # 67M pixels, 201 MB as RGB; the largest budget resizes to 2.6M
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes phones' MPO files

# transformers' Gemma4Config defaults, the real checkpoints' ids
DEFAULT_IMAGE_TOKEN_ID = 258880
DEFAULT_BOI_TOKEN_ID = 255999
DEFAULT_EOI_TOKEN_ID = 258882


@dataclass(frozen=True)
class PatchGeometry:
    """How a model cuts an image: `patch_size`-px patches, pooled (towers) or merged (12B) in
    `pooling_kernel_size` x `pooling_kernel_size` groups, one group per soft token."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    merged: bool = False  # the 12B: the model embeds each group as one large patch

    @property
    def side_multiple(self) -> int:
        """Resized sides are multiples of this: one soft token's width in pixels."""
        return self.patch_size * self.pooling_kernel_size

    @property
    def model_patch_size(self) -> int:
        """The side of the patches in `pixel_values`."""
        return self.side_multiple if self.merged else self.patch_size

    @classmethod
    def from_config(cls, config: dict) -> PatchGeometry:
        """From a checkpoint's config (its `vision_config` and `model_type`)."""
        vision = config.get("vision_config") or {}
        return cls(
            patch_size=int(vision.get("patch_size", 16)),
            pooling_kernel_size=int(vision.get("pooling_kernel_size", 3)),
            merged=config.get("model_type") == "gemma4_unified",
        )


@dataclass(frozen=True)
class PreparedImage:
    """One image, ready for `VisionModel.encode`."""

    pixel_values: np.ndarray  # float32 [num_patches, model_patch_size**2 * 3], values in [0, 1]
    positions: np.ndarray  # int32 [num_patches, 2]: (x, y) of each patch in the patch grid
    num_soft_tokens: int  # N: how many image tokens the prompt holds for it
    height: int  # the resized image, in pixels
    width: int

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        side = int(math.isqrt(self.pixel_values.shape[1] // 3))
        return self.height // side, self.width // side


# --- decoding ----------------------------------------------------------------------------------


def load_image(image):
    """A PIL image from bytes, a file path or a PIL image (returned as is).

    Files are turned upright by their EXIF orientation, as transformers' `load_image` does."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, what = io.BytesIO(bytes(image)), "image data"
        if not source.getbuffer().nbytes:
            raise MTPError("image data is empty")
    elif isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        what = f"image '{path}'"
        try:
            with open(path, "rb") as f:
                source = io.BytesIO(f.read())
        except FileNotFoundError:
            raise MTPError(f"{what} does not exist") from None
        except IsADirectoryError:
            raise MTPError(f"{what} is a folder, not an image file") from None
        except OSError as e:
            raise MTPError(f"cannot read {what}: {e.strerror or e}") from None
    else:
        raise MTPError(f"an image must be bytes, a file path or a PIL image, not {type(image).__name__}")

    try:
        with warnings.catch_warnings():
            # Pillow warns between its own limit and twice it; ours is lower and checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()
            img = Image.open(source, formats=[f for f in ALLOWED_FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError:
        raise MTPError(f"{what} is too large (a decompression bomb?): over {MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        known = signature_format(source.getvalue()[:16])
        if known:  # Pillow gives up on a broken header the same way as on a foreign file
            raise MTPError(f"{what} is a corrupt {known} file: its header cannot be decoded") from None
        raise MTPError(f"{what} is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as e:  # untrusted bytes: Pillow's plugins fail in many ways (struct.error, ...)
        raise MTPError(f"{what} is corrupt: {_reason(e)}") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise MTPError(
            f"{what} is too large: {img.width}x{img.height} pixels, the limit is {MAX_IMAGE_PIXELS} pixels"
        )
    if img.width == 0 or img.height == 0:
        raise MTPError(f"{what} is empty ({img.width}x{img.height} pixels)")
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except Exception as e:  # as above, and a broken EXIF block fails exif_transpose
        raise MTPError(f"{what} is truncated or corrupt: {_reason(e)}") from None


SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def signature_format(head: bytes) -> str | None:
    """The allowed format whose magic bytes `head` starts with, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES.items() if head.startswith(magic)), None)


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def to_rgb(img):
    """RGB, with transparency (an alpha band or a transparent palette entry) composited onto
    white, as the reference processor does."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# --- sizes and patches -------------------------------------------------------------------------


def check_budget(max_soft_tokens: int) -> int:
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        budgets = ", ".join(map(str, SOFT_TOKEN_BUDGETS))
        raise MTPError(f"max_soft_tokens must be one of {budgets}, not {max_soft_tokens!r}")
    return int(max_soft_tokens)


def resized_size(height: int, width: int, max_soft_tokens: int, geometry: PatchGeometry) -> tuple[int, int]:
    """(height, width) the image is resized to: the aspect ratio kept, both sides multiples of
    one soft token's width, the area within the budget. A side too thin for one soft token gets
    exactly one, and the other side at most `max_soft_tokens` of them."""
    side = geometry.side_multiple
    # the same float operations, in the same order, as the reference: floor() must agree exactly
    target_px = max_soft_tokens * geometry.pooling_kernel_size**2 * geometry.patch_size**2
    factor = math.sqrt(target_px / (height * width))
    new_h = int(math.floor(factor * height / side)) * side
    new_w = int(math.floor(factor * width / side)) * side
    longest = max_soft_tokens * side
    if new_h == 0 and new_w == 0:
        raise MTPError(f"cannot resize a {width}x{height} image to the soft-token budget {max_soft_tokens}")
    if new_h == 0:
        new_h, new_w = side, min(int(math.floor(width / height)) * side, longest)
    elif new_w == 0:
        new_h, new_w = min(int(math.floor(height / width)) * side, longest), side
    return new_h, new_w


def num_soft_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
                    geometry: PatchGeometry = PatchGeometry()) -> int:
    """N for an image of this size, without touching its pixels."""
    new_h, new_w = resized_size(height, width, check_budget(max_soft_tokens), geometry)
    return (new_h // geometry.side_multiple) * (new_w // geometry.side_multiple)


def patchify(pixels: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, C] -> (patches [H/p * W/p, p*p*C] row-major, each (row, column, channel);
    positions [.., 2] as (x, y))."""
    h, w, c = pixels.shape
    rows, cols = h // patch, w // patch
    patches = pixels.reshape(rows, patch, cols, patch, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    xs, ys = np.meshgrid(np.arange(cols, dtype=np.int32), np.arange(rows, dtype=np.int32), indexing="xy")
    return patches, np.stack([xs.ravel(), ys.ravel()], axis=-1)


def prepare(image, max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
            geometry: PatchGeometry = PatchGeometry()) -> PreparedImage:
    """Decode (bytes, path or PIL image), resize and cut one image for a model of `geometry`."""
    from PIL import Image

    max_soft_tokens = check_budget(max_soft_tokens)
    img = to_rgb(load_image(image))
    new_h, new_w = resized_size(img.height, img.width, max_soft_tokens, geometry)
    if geometry.merged:
        # the 12B's processor has only a torchvision backend: torch's fixed-point resize, and
        # a float32 rescale
        pixels = resize_bicubic(np.asarray(img, dtype=np.uint8), new_h, new_w)
        pixels = pixels.astype(np.float32) * np.float32(1 / 255)
    else:
        if (new_h, new_w) != (img.height, img.width):
            img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        # the Pillow backend rescales in float64 and then casts
        pixels = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    patches, positions = patchify(pixels, geometry.model_patch_size)
    n = (new_h // geometry.side_multiple) * (new_w // geometry.side_multiple)
    return PreparedImage(patches, positions, n, new_h, new_w)


# --- the prompt --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokenIds:
    """The ids that frame an image in the prompt: boi, then `image` once per soft token, then eoi."""

    image: int = DEFAULT_IMAGE_TOKEN_ID
    boi: int = DEFAULT_BOI_TOKEN_ID
    eoi: int = DEFAULT_EOI_TOKEN_ID

    @classmethod
    def from_config(cls, config: dict) -> ImageTokenIds:
        """From a checkpoint's top-level config (`image_token_id`, `boi_token_id`, `eoi_token_id`)."""
        return cls(
            image=int(config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)),
            boi=int(config.get("boi_token_id", DEFAULT_BOI_TOKEN_ID)),
            eoi=int(config.get("eoi_token_id", DEFAULT_EOI_TOKEN_ID)),
        )


def image_token_ids(num_tokens: int, ids: ImageTokenIds = ImageTokenIds()) -> list[int]:
    """The ids one image takes in the prompt: boi + image x N + eoi."""
    return [ids.boi] + [ids.image] * num_tokens + [ids.eoi]


def expand_image_placeholders(token_ids: list[int], counts: list[int],
                              ids: ImageTokenIds = ImageTokenIds()) -> list[int]:
    """Replace the i-th lone image token (one per image, as a chat template writes it) by
    boi + image x counts[i] + eoi, as the reference processor does to the prompt text."""
    places = [i for i, t in enumerate(token_ids) if t == ids.image]
    if len(places) != len(counts):
        raise MTPError(f"the prompt has {len(places)} image placeholders for {len(counts)} images")
    out, start = [], 0
    for place, n in zip(places, counts):
        out += list(token_ids[start:place]) + image_token_ids(n, ids)
        start = place + 1
    return out + list(token_ids[start:])


def expand_image_text(text: str, counts: list[int], image_token: str, boi_token: str, eoi_token: str) -> str:
    """The same on prompt text: the i-th `image_token` becomes boi + image x counts[i] + eoi."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(counts):
        raise MTPError(f"the prompt has {len(pieces) - 1} image placeholders for {len(counts)} images")
    out = [pieces[0]]
    for n, rest in zip(counts, pieces[1:]):
        out += [boi_token, image_token * n, eoi_token, rest]
    return "".join(out)
