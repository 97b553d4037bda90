"""The 12B's encoder-free vision embedder (gemma4_unified), in MLX.

No attention and no pooling: each 48x48 patch (3x3 groups of 16-px patches, flattened row,
column, channel, values in [0, 1] as the processor gives them) is one soft token:

    LayerNorm -> Linear (with bias) -> LayerNorm -> + x and y position embeddings -> LayerNorm
    -> embed_vision: RMSNorm without weight, then a linear map to the text hidden size.

Names as in the checkpoints without `model.`: `vision_embedder.*` (patch_ln1, patch_dense,
patch_ln2, pos_embedding [positions, 2, dims], pos_norm) and `embed_vision.embedding_projection`.
transformers renames them on load (`embed_vision.patch_ln1`, ...,
`embed_vision.multimodal_embedder.embedding_projection`); a folder saved under those names loads too.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma_mtp.errors import MTPError

from .encoder import MultimodalEmbedder

EMBEDDER_PARTS = ("patch_ln1", "patch_dense", "patch_ln2", "pos_embedding", "pos_norm")


@dataclass
class UnifiedArgs:
    """The 12B's `vision_config` (transformers' Gemma4UnifiedVisionConfig defaults) and the text
    hidden size."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6
    text_hidden_size: int = 3840

    @classmethod
    def from_config(cls, config: dict) -> UnifiedArgs:
        vision = dict(config.get("vision_config") or {})
        vision["text_hidden_size"] = (config.get("text_config") or {}).get("hidden_size", cls.text_hidden_size)
        return cls(**{k: vision[k] for k in cls.__dataclass_fields__ if k in vision})

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size


class VisionEmbedder(nn.Module):
    def __init__(self, args: UnifiedArgs):
        super().__init__()
        patch_dims, dims = 3 * args.model_patch_size**2, args.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(patch_dims)
        self.patch_dense = nn.Linear(patch_dims, dims)
        self.patch_ln2 = nn.LayerNorm(dims)
        self.pos_embedding = mx.zeros((args.mm_posemb_size, 2, dims))  # [position, axis (x, y), dims]
        self.pos_norm = nn.LayerNorm(dims)

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        table = self.pos_embedding
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixels.astype(table.dtype))))
        h = h + table[positions[:, 0], 0] + table[positions[:, 1], 1]
        return self.pos_norm(h)


class UnifiedEmbedder(nn.Module):
    """vision_embedder + embed_vision: one image's 48-px patches -> its soft tokens [N, text_hidden]."""

    def __init__(self, args: UnifiedArgs):
        super().__init__()
        self.args = args
        self.vision_embedder = VisionEmbedder(args)
        self.embed_vision = MultimodalEmbedder(args.output_proj_dims, args.text_hidden_size, args.rms_norm_eps)

    @property
    def patch_pixels(self) -> int:
        return 3 * self.args.model_patch_size**2

    def __call__(self, pixels: mx.array, positions: np.ndarray, grid: tuple[int, int]) -> mx.array:
        if positions.max(initial=-1) >= self.args.mm_posemb_size:
            raise MTPError(f"the image is {max(grid)} patches long, the vision embedder knows "
                           f"{self.args.mm_posemb_size} positions: use a smaller max_soft_tokens")
        return self.embed_vision(self.vision_embedder(pixels, mx.array(positions)))

    def sanitize(self, weights: dict) -> dict:
        """The checkpoint's vision tensors under this module's names."""
        out = {}
        for name, value in weights.items():
            name = name.removeprefix("model.")
            if name.startswith("embed_vision.multimodal_embedder."):  # transformers' runtime names
                name = "embed_vision." + name.removeprefix("embed_vision.multimodal_embedder.")
            elif name.startswith(tuple(f"embed_vision.{part}" for part in EMBEDDER_PARTS)):
                name = "vision_embedder." + name.removeprefix("embed_vision.")
            if name.startswith(("vision_embedder.", "embed_vision.")):
                out[name] = value
        return out
