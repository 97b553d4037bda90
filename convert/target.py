"""Target conversion: mlx-lm's Gemma 4 model, loaded from a Hugging Face checkpoint."""

import contextlib
import io
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4, gemma4_text
from mlx_lm.utils import quantize_model, save_config, save_model

from mlx_gemma_mtp.checkpoint import cast_floats, load_tensors
from mlx_gemma_mtp.errors import MTPError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def model_classes(config: dict):
    module = gemma4_text if config["model_type"] == "gemma4_text" else gemma4
    return module.Model, module.ModelArgs


def build_target(files: list[Path], config: dict, dtype: mx.Dtype) -> nn.Module:
    """mlx-lm's model for a normalized config, with the checkpoint's weights (lazily) loaded."""
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(load_tensors(files, "target"))
    weights = cast_floats(weights, dtype)
    load_strict(model, weights, "target")
    return model


def load_strict(model: nn.Module, weights: dict, role: str) -> None:
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        detail = " ".join(str(e).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise MTPError(f"{role} weights do not match its config: {detail}") from None


def router_at_8_bits(path: str, module: nn.Module):
    # The MoE router decides which experts run: keep it at 8-bit affine whatever the mode.
    if path.endswith("router.proj"):
        return {"group_size": 64, "bits": 8, "mode": "affine"}
    return True


def quantize(model: nn.Module, config: dict, bits: int, group_size: int, mode: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its own summary
        _, config = quantize_model(
            model, config, group_size, bits, mode=mode, quant_predicate=router_at_8_bits
        )
    return config


def save_target(model: nn.Module, config: dict, source: Path, out: Path) -> None:
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    if not (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").is_file():
        raise MTPError(f"target '{source}' has no tokenizer (tokenizer.json or tokenizer.model)")
