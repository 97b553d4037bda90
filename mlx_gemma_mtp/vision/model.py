"""Loading the vision part of a checkpoint, and `VisionModel`: images -> soft tokens.

Reads only the safetensors files that hold vision tensors (a checkpoint's index says which), so
loading the vision part of a 31B does not touch its text weights. Linears stored quantized
(`weight`/`scales`/`biases`, as mlx-vlm writes `embed_vision` and as any converter may write the
rest) become QuantizedLinear the way mlx-lm does it: the config's `quantization` entry for that
module's path if there is one, else bits and group size read off the stored shapes.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma_mtp.model.checkpoint import check_safetensors, load_tensors, read_config, weight_files
from mlx_gemma_mtp.errors import MTPError

from .encoder import CLIP_BOUNDS, ClippableLinear, TowerEmbedder, VisionArgs
from .processor import DEFAULT_SOFT_TOKENS, ImageTokenIds, PatchGeometry, PreparedImage, image_token_ids, prepare
from .unified import UnifiedArgs, UnifiedEmbedder

VISION_PREFIXES = ("vision_tower.", "embed_vision.", "vision_embedder.")


def is_vision_tensor(name: str) -> bool:
    return name.removeprefix("model.").startswith(VISION_PREFIXES)


class VisionModel:
    """A checkpoint's image encoder: `prepare` an image, `encode` prepared images into the soft
    tokens that replace its image tokens in the text embeddings."""

    def __init__(self, module: nn.Module, geometry: PatchGeometry, token_ids: ImageTokenIds):
        self.module = module  # TowerEmbedder or UnifiedEmbedder
        self.geometry = geometry
        self.token_ids = token_ids

    @property
    def text_hidden_size(self) -> int:
        return self.module.args.text_hidden_size

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded vision weights."""
        return sum(v.nbytes for _, v in tree_flatten(self.module.parameters()))

    def prepare(self, image, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> PreparedImage:
        """Decode, resize and cut `image` (bytes, a path or a PIL image) for this model."""
        return prepare(image, max_soft_tokens, self.geometry)

    def prompt_ids(self, image: PreparedImage) -> list[int]:
        """The ids the image takes in the prompt: boi + image x N + eoi."""
        return image_token_ids(image.num_soft_tokens, self.token_ids)

    def encode(self, images: list[PreparedImage]) -> list[mx.array]:
        """Each image's soft tokens [N_i, text_hidden], evaluated, in the model's dtype: what the
        reference scatters into the text embeddings at that image's N_i image-token positions."""
        out = []
        for image in images:
            if image.pixel_values.shape[1] != self.module.patch_pixels:
                raise MTPError(
                    f"the image was prepared for {image.pixel_values.shape[1]}-value patches, this model takes "
                    f"{self.module.patch_pixels}: prepare it with this model's prepare()"
                )
            features = self.module(mx.array(image.pixel_values), image.positions, image.grid)
            out.append(features)
        mx.eval(out)
        for image, features in zip(images, out):
            assert features.shape[0] == image.num_soft_tokens, (features.shape, image.num_soft_tokens)
        return out


def load_vision(folder: Path, config: dict | None = None) -> VisionModel | None:
    """The vision part of the model in `folder` (Google's layout, an mlx-community folder, or a
    pair's target folder), or None when the model has no vision config or no vision weights.

    `config` is the folder's config.json as read; without a `vision_config` (our normalized
    configs drop it) the folder's own config.json is read again."""
    folder = Path(folder)
    if not config or "vision_config" not in config:
        config = read_config(folder, "model")
    if not config.get("vision_config"):
        return None
    module = vision_module(config)
    weights = module.sanitize(read_vision_tensors(folder))
    if not weights:
        return None
    fill(module, weights, config.get("quantization") or {}, folder)
    mx.eval(module.parameters())
    return VisionModel(module, PatchGeometry.from_config(config), ImageTokenIds.from_config(config))


def vision_module(config: dict) -> nn.Module:
    """The empty image encoder for a checkpoint's config (one with a `vision_config`)."""
    if config.get("model_type") == "gemma4_unified":
        return UnifiedEmbedder(UnifiedArgs.from_config(config))
    return TowerEmbedder(VisionArgs.from_config(config))


def fill(module: nn.Module, weights: dict, quantization: dict, folder: Path) -> None:
    """Load sanitized `weights` into `module`, quantized where they are stored quantized."""
    quantize_as_stored(module, weights, quantization)
    weights = with_default_clip_bounds(module, weights)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        detail = " ".join(str(e).split())
        raise MTPError(f"vision weights in '{folder}' do not match its vision_config: {detail[:300]}") from None


def read_vision_tensors(folder: Path) -> dict[str, mx.array]:
    """Every vision tensor of the checkpoint, from only the files that hold some."""
    files = [f for f in weight_files(folder, "model") if any(map(is_vision_tensor, check_safetensors(f, "model")))]
    tensors = load_tensors(files, "model")
    return {name: value for name, value in tensors.items() if is_vision_tensor(name)}


def quantize_as_stored(module: nn.Module, weights: dict, quantization: dict) -> None:
    """Swap in QuantizedLinear wherever the checkpoint stores a linear quantized."""
    if not any(name.endswith(".scales") for name in weights):
        return
    from mlx_lm.utils import infer_quant_config

    def stored_quantized(path: str, layer: nn.Module):
        if not hasattr(layer, "to_quantized") or f"{path}.scales" not in weights:
            return False
        if path in quantization:  # a per-module entry, as mlx-lm reads it
            return quantization[path]
        return infer_quant_config(path, layer, weights)

    nn.quantize(
        module,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=stored_quantized,
    )


def with_default_clip_bounds(module: nn.Module, weights: dict) -> dict:
    """Clip bounds a checkpoint leaves out are the reference's defaults: no clipping."""
    out = dict(weights)
    for path, layer in module.named_modules():
        if isinstance(layer, ClippableLinear) and layer.clipped:
            for bound in CLIP_BOUNDS:
                out.setdefault(f"{path}.{bound}", mx.array(-math.inf if bound.endswith("min") else math.inf))
    return out
