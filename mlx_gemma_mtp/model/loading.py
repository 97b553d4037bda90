"""Loading a pair: the target through mlx-lm with our normalized config, its tokenizer, and the
drafter. Where the folders are and how their files are read is `checkpoint.py`'s business."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from mlx_gemma_mtp.model.checkpoint import check_safetensors, pair_folders, read_config, read_json, weight_files
from mlx_gemma_mtp.model.config import normalize_draft_config, normalize_target_config, validate_pair
from mlx_gemma_mtp.runtime.images import ImageEncoder
from mlx_gemma_mtp.runtime.pair import Pair
from mlx_gemma_mtp.model.drafter import load_drafter
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.model.sharding import attach, launched_group, shard_target


def load(path, draft_path: Optional[str] = None, draft: bool = True) -> tuple[Pair, TokenizerWrapper]:
    """Load a converted pair folder, or a target (mlx-lm or Hugging Face folder, or hub id) and
    optionally its drafter (`draft_path` replaces a pair's own). With draft=False no drafter is
    resolved, downloaded or read, and generation is plain decoding."""
    target_dir, draft_dir = pair_folders(path, draft_path, draft)
    target_config = normalize_target_config(read_config(target_dir, "target"))
    draft_config = None
    if draft_dir is not None:
        # the pair is checked before any weights are read
        draft_config = normalize_draft_config(read_config(draft_dir, "drafter"))
        validate_pair(target_config, draft_config)
    group = launched_group()  # None in a process no launcher started
    model, local_heads = load_target(target_dir, target_config, group)
    tokenizer = load_tokenizer(target_dir, eos_token_ids=_eos_ids(target_dir, target_config))
    drafter = load_drafter(draft_dir)[0] if draft_dir is not None else None  # whole on every rank
    # the vision model is read on the first image only (ImageEncoder): text pays nothing for it
    pair = Pair(model, drafter, target_config=target_config, draft_config=draft_config, images=ImageEncoder(target_dir))
    if group is not None:
        attach(pair, group, local_heads)
    return pair, tokenizer


def load_target(folder: Path, config: dict, group=None):
    """mlx-lm's model for the folder, with our normalized config (it fixes the fields mlx-lm
    would otherwise default differently). With a group of processes: this rank's slices only
    (split before the lazily loaded weights are read), and what `sharding.attach` needs."""
    # mlx-lm reads every model*.safetensors with mx.load, whose errors on a truncated or
    # corrupt file are RuntimeErrors: check them all first
    checked = set(weight_files(folder, "target"))
    for f in sorted(folder.glob("model*.safetensors")):
        if f not in checked:
            check_safetensors(f, "target")
    try:
        model, _ = load_model(folder, lazy=group is not None, model_config=config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise MTPError(f"cannot load target '{folder}': {' '.join(str(e).split())[:300]}") from None
    if group is None:
        return model, {}
    local_heads = shard_target(model, group)
    mx.eval(model.parameters())
    return model, local_heads


def check_pair(target_config: dict, draft_config: dict) -> None:
    """MTPError unless the drafter's config fits the target's (raw or normalized)."""
    validate_pair(normalize_target_config(target_config), normalize_draft_config(draft_config))


def _eos_ids(folder: Path, config: dict) -> Optional[list]:
    eos = config.get("eos_token_id") or config.get("text_config", {}).get("eos_token_id")
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = read_json(generation, "generation config").get("eos_token_id", eos)
    if eos is None:
        return None
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
