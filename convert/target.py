"""Target conversion: mlx-lm's Gemma 4 model, loaded from a Hugging Face checkpoint."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4, gemma4_text
from mlx_lm.utils import quantize_model, save_config, save_model

from mlx_gemma_mtp.model.checkpoint import cast_floats, load_tensors
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


# --- vision ------------------------------------------------------------------------------------

VISION_FILE = "model-vision.safetensors"  # mlx-lm reads model*.safetensors and drops these names


def build_vision(source: Path, config: dict, dtype: mx.Dtype):
    """The source's image encoder (`raw` config, with its vision_config), cast to `dtype`; None
    for a model without one. Built, and so checked, before anything is written."""
    from mlx_gemma_mtp.vision.model import fill, read_vision_tensors, vision_module

    if not config.get("vision_config"):
        return None
    module = vision_module(config)
    weights = module.sanitize(read_vision_tensors(source))
    if not weights:
        return None
    fill(module, weights, config.get("quantization") or {}, source)
    module.update(cast_floats(module.parameters(), dtype))
    return module


def quantize_vision(module: nn.Module, bits: int, group_size: int, mode: str) -> None:
    """As mlx-vlm converts: the projections into the text model (`embed_vision`, the 12B's
    `vision_embedder`) quantized like the text, the vision tower kept in full precision."""

    def projection(path: str, layer: nn.Module) -> bool:
        return (
            path.startswith(("embed_vision.", "vision_embedder."))
            and hasattr(layer, "to_quantized")
            and layer.weight.shape[-1] % group_size == 0
        )

    nn.quantize(module, group_size, bits, mode=mode, class_predicate=projection)


def save_vision(module: nn.Module, vision_config: dict, out: Path) -> None:
    """The vision tensors under mlx-community's names, in one more shard of the target folder,
    and the vision_config back in its config.json (normalizing for mlx-lm drops it)."""
    weights = dict(tree_flatten(module.parameters()))
    mx.save_safetensors(str(out / VISION_FILE), weights, metadata={"format": "mlx"})
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: VISION_FILE for name in weights})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + sum(v.nbytes for v in weights.values())
    index_path.write_text(json.dumps(index, indent=4))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["vision_config"] = vision_config
    config_path.write_text(json.dumps(config, indent=4, sort_keys=True))
