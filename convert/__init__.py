"""`gemma-mtp convert`: Hugging Face Gemma 4 target (+ MTP drafter) -> an MLX pair folder.

    DIR/target/   an mlx-lm model folder (mlx_lm.load works on it unchanged)
    DIR/draft/    the drafter, Hugging Face tensor names, safetensors + config.json
    DIR/mtp.json  the manifest: sources, dtypes, quantization, bits per weight
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import compute_bits_per_weight
from tqdm import tqdm

from mlx_gemma_mtp import __version__
from mlx_gemma_mtp.model.checkpoint import (
    cast_floats,
    check_output,
    output_folder,
    read_config,
    resolve_source,
    source_record,
    weight_files,
    with_dtype,
    write_manifest,
)
from mlx_gemma_mtp.model.config import normalize_draft_config, normalize_target_config, text_config_of, validate_pair
from mlx_gemma_mtp.model.drafter import load_drafter, save_drafter
from mlx_gemma_mtp.errors import MTPError

from .draft import quantize_drafter
from .target import build_target, build_vision, quantize, quantize_vision, save_target, save_vision

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
MODE_DEFAULTS = {"affine": (4, 64), "mxfp4": (4, 32), "mxfp8": (8, 32)}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"


def quant_spec(bits: int | None, group_size: int | None, mode: str) -> QuantSpec:
    """Check quantization flags the way MLX will, before any work is done."""
    if mode not in MODE_DEFAULTS:
        raise MTPError(f"unknown quantization mode '{mode}': expected one of {', '.join(MODE_DEFAULTS)}")
    default_bits, default_group = MODE_DEFAULTS[mode]
    bits = default_bits if bits is None else bits
    group_size = default_group if group_size is None else group_size
    if mode == "affine":
        if bits not in (2, 3, 4, 5, 6, 8):
            raise MTPError(f"affine quantization supports 2, 3, 4, 5, 6 or 8 bits, not {bits}")
        if group_size not in (32, 64, 128):
            raise MTPError(f"affine quantization supports group sizes 32, 64 or 128, not {group_size}")
    elif (bits, group_size) != (default_bits, default_group):
        raise MTPError(f"{mode} quantization is {default_bits} bits with group size {default_group}")
    return QuantSpec(bits, group_size, mode)


def source_dtype(config: dict) -> str:
    for c in (config, text_config_of(config)):
        dtype = c.get("dtype") or c.get("torch_dtype")
        if dtype in DTYPES:
            return dtype
    return "bfloat16"


@dataclass
class ConvertResult:
    out: Path
    target_bits_per_weight: float
    draft_bits_per_weight: float | None


def convert(
    target: str,
    out: str | Path,
    draft: str | None = None,
    quantization: QuantSpec | None = None,
    draft_bits: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> ConvertResult:
    """Convert a target (and optionally its drafter) into an MLX pair folder, atomically.

    Everything is checked before anything is written; the folder appears whole or not at all.
    """
    out = Path(out).expanduser()
    check_output(out, force)  # an existing or unwritable output fails before any work
    if dtype is not None and dtype not in DTYPES:
        raise MTPError(f"unknown dtype '{dtype}': expected one of {', '.join(DTYPES)}")

    # 1. Everything that can fail on bad input, before touching the output.
    target_dir = resolve_source(target, "target")
    raw_target_config = read_config(target_dir, "target")
    target_config = normalize_target_config(raw_target_config)
    target_files = weight_files(target_dir, "target")
    require_tokenizer(target_dir)
    draft_dir = draft_config = None
    if draft is not None:
        draft_dir = resolve_source(draft, "drafter")
        draft_config = normalize_draft_config(read_config(draft_dir, "drafter"))
        validate_pair(target_config, draft_config)
        weight_files(draft_dir, "drafter")
    if draft_bits is not None and quantization is None:
        draft_quant = quant_spec(draft_bits, None, "affine")
    elif draft_bits is not None:
        draft_quant = quant_spec(draft_bits, quantization.group_size, quantization.mode)
    else:
        draft_quant = None

    dtype = dtype or source_dtype(target_config)
    target_model = build_target(target_files, target_config, DTYPES[dtype])
    vision_model = build_vision(target_dir, raw_target_config, DTYPES[dtype])
    draft_model = None
    if draft_dir is not None:
        draft_model, raw_draft_config = load_drafter(draft_dir)
        draft_model.update(cast_floats(draft_model.parameters(), DTYPES[dtype]))

    # 2. Build the pair in a hidden folder beside the output, then move it into place.
    with output_folder(out, force) as tmp:
        # the configs say the dtype the weights are saved in, not the source's
        target_config = with_dtype(target_config, dtype)
        if quantization is not None:
            target_config = quantize(
                target_model, target_config, quantization.bits, quantization.group_size, quantization.mode
            )
        materialize(target_model, "target", progress)
        save_target(target_model, target_config, target_dir, tmp / "target")
        if vision_model is not None:
            if quantization is not None:
                quantize_vision(vision_model, quantization.bits, quantization.group_size, quantization.mode)
            save_vision(vision_model, raw_target_config["vision_config"], tmp / "target")
        target_part = part_record("target", target, target_config, dtype, quantization, target_model)
        draft_part = None
        if draft_model is not None:
            raw_draft_config = with_dtype(raw_draft_config, dtype)
            if draft_quant is not None:
                raw_draft_config = quantize_drafter(draft_model, raw_draft_config, draft_quant)
            materialize(draft_model, "drafter", progress)
            save_drafter(draft_model, raw_draft_config, tmp / "draft")
            draft_part = part_record("draft", draft, raw_draft_config, dtype, draft_quant, draft_model)
        write_manifest(tmp, f"mlx-gemma-mtp {__version__}", target_part, draft_part)
    draft_bpw = None if draft_part is None else draft_part["bits_per_weight"]
    return ConvertResult(out, target_part["bits_per_weight"], draft_bpw)


def require_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise MTPError(f"target '{folder}' has no tokenizer (tokenizer.json or tokenizer.model)")


def materialize(model: nn.Module, name: str, progress: bool) -> None:
    """Evaluate (load, cast, quantize) every tensor, one at a time, with a progress bar."""
    tensors = tree_flatten(model.parameters())
    for _, value in tqdm(tensors, desc=f"converting {name}", unit="tensor", disable=not progress):
        mx.eval(value)


def part_record(path, source, config, dtype, quant: QuantSpec | None, model) -> dict:
    return {
        "path": path,
        "source": source_record(source),
        "model_type": config["model_type"],
        "dtype": dtype,
        "quantization": asdict(quant) if quant else None,
        "bits_per_weight": round(float(compute_bits_per_weight(model)), 3),
    }
