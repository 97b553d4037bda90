"""Images in: Gemma 4's image processor and vision encoders in MLX (no mlx-vlm, no OpenCV, no torch).

    vision = load_vision(target_dir, config)        # None: the model has no vision weights
    image = vision.prepare(png_bytes, max_soft_tokens=280)
    ids = vision.prompt_ids(image)                   # boi + image_token x N + eoi
    [soft_tokens] = vision.encode([image])           # [N, text_hidden]

Nothing here is imported or loaded until an image is given: `import mlx_gemma_mtp.vision` is cheap
and text-only use never reads a vision weight.

How the reference (transformers 5.22, `Gemma4Model.forward` / `Gemma4UnifiedModel.forward`) puts
an image into the text model, for whoever builds the prefill:

- Prompt: each image is `boi + image_token x N + eoi` (ids from the config: `boi_token_id`,
  `image_token_id`, `eoi_token_id`; 255999 / 258880 / 258882 on the real checkpoints), N from
  `prepare` (N <= max_soft_tokens, one of 70/140/280/560/1120). A chat template writes one
  `image_token` per image; `expand_image_placeholders` expands it as the reference processor does.
- Text embeddings: every image/audio/video token id is replaced by `pad_token_id` (0) and
  embedded as usual: `embed_tokens(id) * sqrt(hidden)` (the scale cast to the weight dtype first).
  Then the rows at image-token positions are overwritten, in order, by `encode`'s soft tokens,
  which are NOT scaled by sqrt(hidden): they already are what the reference scatters in. boi and
  eoi are ordinary text tokens.
- Per-layer inputs (E2B/E4B): the token part is `embed_tokens_per_layer(id) * sqrt(ple_dim)` with
  the same substitution: the pad id at image positions. The projection part is computed from the
  merged embeddings (soft tokens included): `norm(per_layer_model_projection(h) / sqrt(hidden))`,
  then `(projection + token part) / sqrt(2)`.
- Feeding mlx-lm 0.32.2's gemma4 (`model(ids, cache, input_embeddings=, per_layer_inputs=)`): it
  multiplies `input_embeddings` by sqrt(hidden) itself (a Python float, so rounded to the
  embeddings' dtype), so pass text rows unscaled and image rows as
  `soft_tokens / mx.array(sqrt(hidden), dtype)`: the product gives back the soft tokens up to one
  rounding. For the per-layer token part pass the ids with `pad_token_id` at the image positions
  (mlx-lm embeds them when `per_layer_inputs` is None), or `per_layer_inputs` =
  `language_model.model._get_per_layer_inputs(ids_with_pad)` [B, L, layers, ple_dim]; either way
  mlx-lm adds the projection of the merged embeddings itself. Never the raw image ids: 258880 is a
  valid per-layer-embedding row, just the wrong one.
- Attention over image tokens, when `text_config.use_bidirectional_attention == "vision"` (the
  12B's default; read it from the config for the others: transformers says the small models leave
  it unset, i.e. all causal) and the processor's `mm_token_type_ids` is passed (the normal path).
  A block is a run of consecutive `image_token_id` positions (boi/eoi are not in it), i.e. one image:
  * towers (`Gemma4Model`): full-attention layers stay causal; sliding layers allow
    (causal OR same block) AND inside the sliding window.
  * 12B (`Gemma4UnifiedModel.forward`): the block is OR-ed into every layer's mask, after the
    window: image tokens of one image see each other on full and sliding layers, whatever the
    window. (The class's static `create_masks_for_generate`, used only with compilable caches,
    builds the towers' masks instead: the reference disagrees with itself; the forward path is the
    default one.)
  Only prefill sees blocks; decoding steps are causal. The MTP drafter is unchanged: it reads the
  target's hidden state and K/V, which already carry the image.
"""

__all__ = [
    "load_vision", "VisionModel", "prepare", "PreparedImage", "PatchGeometry", "ImageTokenIds",
    "image_token_ids", "expand_image_placeholders", "expand_image_text", "num_soft_tokens", "load_image",
    "SOFT_TOKEN_BUDGETS", "DEFAULT_SOFT_TOKENS",
]

_HOMES = {"load_vision": "model", "VisionModel": "model"}


def __getattr__(name):
    # mlx and Pillow are imported on first use only
    if name not in __all__:
        raise AttributeError(f"module 'mlx_gemma_mtp.vision' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES.get(name, 'processor')}", __name__), name)
