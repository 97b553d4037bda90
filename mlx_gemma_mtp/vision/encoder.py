"""The vision tower of Gemma 4 E2B/E4B/26B/31B and its `embed_vision` projection, in MLX.

One image at a time, without padding (the reference pads a batch to the budget and masks the
padding out; one unpadded image computes the same thing):

    patches [P, 3*p*p] in [0, 1] -> 2x - 1 -> input_proj + x/y position embeddings
    -> encoder layers (bidirectional attention, 2-D RoPE over (x, y), q/k/v norms, attention scale 1,
       gated GELU MLP, four RMSNorms per layer; linears optionally clip their inputs and outputs)
    -> mean over each k x k group of patches, times sqrt(hidden), optionally standardized
    -> embed_vision: RMSNorm without weight, then a linear map to the text hidden size.

Parameter names are the checkpoints' without the `model.` prefix (`vision_tower.*`,
`embed_vision.*`), as mlx-vlm writes them, so quantized mlx-community folders load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma_mtp.errors import MTPError

ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu": nn.gelu}
CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")
QUERY_CHUNK = 2048  # patches per attention call (1120 soft tokens are 10080 patches)


@dataclass
class VisionArgs:
    """The checkpoint's `vision_config` (transformers' Gemma4VisionConfig defaults) and the text
    hidden size `embed_vision` projects to."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False
    text_hidden_size: int = 1536

    @classmethod
    def from_config(cls, config: dict) -> VisionArgs:
        vision = dict(config.get("vision_config") or {})
        text = config.get("text_config") or {}
        vision["rope_theta"] = (vision.get("rope_parameters") or {}).get("rope_theta", cls.rope_theta)
        vision["text_hidden_size"] = text.get("hidden_size", cls.text_hidden_size)
        args = cls(**{k: vision[k] for k in cls.__dataclass_fields__ if k in vision})
        if args.hidden_activation not in ACTIVATIONS:
            raise MTPError(f"unsupported vision activation '{args.hidden_activation}'")
        if args.head_dim % 4:
            raise MTPError(f"vision head_dim {args.head_dim} is not a multiple of 4 (2-D RoPE)")
        return args


class ClippableLinear(nn.Module):
    """A bias-free linear under `.linear`; with clipping, its input and output are clamped to
    bounds stored in the checkpoint (E2B/E4B use them to keep activations in range)."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


class RMSNorm(nn.Module):
    """Gemma 4's RMSNorm: x / rms(x) * weight (no 1 + w offset)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def rope_2d(positions: np.ndarray, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin [P, head_dim] for 2-D RoPE: the first half of a head turns with x, the second
    with y, each half in the usual rotate-half layout."""
    half = head_dim // 2
    # float32 throughout, as the reference computes them
    inv_freq = (1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half))).astype(np.float32)
    angles = [positions[:, axis, None].astype(np.float32) * inv_freq for axis in (0, 1)]
    angles = np.concatenate([angles[0], angles[0], angles[1], angles[1]], axis=-1)
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


def apply_rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, P, heads, head_dim]; rotate-half within each of the two halves separately."""
    quarter = x.shape[-1] // 4
    parts = [x[..., i * quarter:(i + 1) * quarter] for i in range(4)]  # x-lo, x-hi, y-lo, y-hi
    rotated = mx.concatenate([-parts[1], parts[0], -parts[3], parts[2]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.eps = args.rms_norm_eps
        clip, hidden = args.use_clipped_linears, args.hidden_size
        self.q_proj = ClippableLinear(hidden, self.heads * self.head_dim, clip)
        self.k_proj = ClippableLinear(hidden, self.kv_heads * self.head_dim, clip)
        self.v_proj = ClippableLinear(hidden, self.kv_heads * self.head_dim, clip)
        self.o_proj = ClippableLinear(self.heads * self.head_dim, hidden, clip)
        self.q_norm = RMSNorm(self.head_dim, self.eps)
        self.k_norm = RMSNorm(self.head_dim, self.eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, length, self.kv_heads, self.head_dim)
        v = mx.fast.rms_norm(v, None, self.eps)  # v is normalized too, without a weight
        q = apply_rope_2d(q, cos, sin).transpose(0, 2, 1, 3)
        k = apply_rope_2d(k, cos, sin).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        # every patch sees every patch; the q/k norms replace the 1/sqrt(d) scale. Queries go in
        # chunks: a head dim without a fused kernel (the 26B's 72) builds the whole score matrix,
        # 10080^2 per head at the largest budget.
        out = mx.concatenate([
            mx.fast.scaled_dot_product_attention(q[:, :, i:i + QUERY_CHUNK], k, v, scale=1.0)
            for i in range(0, length, QUERY_CHUNK)
        ], axis=2)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        clip = args.use_clipped_linears
        self.gate_proj = ClippableLinear(args.hidden_size, args.intermediate_size, clip)
        self.up_proj = ClippableLinear(args.hidden_size, args.intermediate_size, clip)
        self.down_proj = ClippableLinear(args.intermediate_size, args.hidden_size, clip)
        self.act = ACTIVATIONS[args.hidden_activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        dims, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(dims, eps)
        self.post_attention_layernorm = RMSNorm(dims, eps)
        self.pre_feedforward_layernorm = RMSNorm(dims, eps)
        self.post_feedforward_layernorm = RMSNorm(dims, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        # [axis (x, y), position, hidden]
        self.position_embedding_table = mx.zeros((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        table = self.position_embedding_table
        # the model wants [-1, 1], the processor gives [0, 1]; mapped in float32, then cast
        h = self.input_proj((2 * (pixels.astype(mx.float32) - 0.5)).astype(table.dtype))
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionTower(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = Encoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, pixels: mx.array, positions: np.ndarray, grid: tuple[int, int]) -> mx.array:
        """pixels [P, 3*p*p] in row-major patch order, positions [P, 2] (x, y), grid (rows,
        columns) of patches -> pooled features [P / k^2, hidden]."""
        args = self.args
        if positions.max(initial=-1) >= args.position_embedding_size:
            raise MTPError(f"the image is {max(grid)} patches long, the vision tower knows "
                           f"{args.position_embedding_size} positions: use a smaller max_soft_tokens")
        cos, sin = rope_2d(positions, args.head_dim, args.rope_theta)
        dtype = self.patch_embedder.position_embedding_table.dtype  # never quantized
        x = self.patch_embedder(pixels, mx.array(positions))[None]
        for layer in self.encoder.layers:
            x = layer(x, cos.astype(dtype), sin.astype(dtype))
        # mean over each k x k group, in float32 (sqrt(hidden) can leave the float16 range)
        rows, cols, k = grid[0], grid[1], args.pooling_kernel_size
        x = x.astype(mx.float32).reshape(rows // k, k, cols // k, k, -1).mean(axis=(1, 3))
        x = x.reshape(-1, args.hidden_size) * math.sqrt(args.hidden_size)
        if args.standardize:
            x = (x - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return x.astype(dtype)


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> the text model's embedding space: RMSNorm without weight, then a linear."""

    def __init__(self, dims_in: int, dims_out: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(dims_in, dims_out, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))


class TowerEmbedder(nn.Module):
    """vision_tower + embed_vision: one image's patches -> its soft tokens [N, text_hidden]."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionTower(args)
        self.embed_vision = MultimodalEmbedder(args.hidden_size, args.text_hidden_size, args.rms_norm_eps)

    @property
    def patch_pixels(self) -> int:
        return 3 * self.args.patch_size**2

    def __call__(self, pixels: mx.array, positions: np.ndarray, grid: tuple[int, int]) -> mx.array:
        return self.embed_vision(self.vision_tower(pixels, positions, grid))

    def sanitize(self, weights: dict) -> dict:
        """The checkpoint's vision tensors under this module's names."""
        out = {}
        for name, value in weights.items():
            name = name.removeprefix("model.")
            if not name.startswith(("vision_tower.", "embed_vision.")) or "rotary_emb" in name:
                continue
            if name.rsplit(".", 1)[-1] in CLIP_BOUNDS and not self.args.use_clipped_linears:
                continue  # written by some converters even when unused
            out[name] = value
        return out
