"""Reading a Hugging Face checkpoint folder: its config and its safetensors, checked before use."""

import json
import struct
from pathlib import Path

import mlx.core as mx

from mlx_gemma_mtp.errors import MTPError


def read_config(folder: Path, role: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MTPError(f"{role} folder '{folder}' has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MTPError(f"{role} config '{path}' is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MTPError(f"{role} config '{path}' is not a JSON object")
    return config


def weight_files(folder: Path, role: str) -> list[Path]:
    """The safetensors files of a checkpoint, each checked to be complete."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MTPError(f"{role} index '{index}' is corrupt ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise MTPError(f"{role} shard '{f.name}' named in {index.name} is missing from '{folder}'")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MTPError(f"{role} folder '{folder}' has no .safetensors weights")
    for f in files:
        check_safetensors(f, role)
    return files


def check_safetensors(path: Path, role: str) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise MTPError(f"{role} weights '{path}' are corrupt or not safetensors ({e})") from None
    if 8 + header_len + end != size:
        raise MTPError(
            f"{role} weights '{path}' are truncated or corrupt "
            f"({size} bytes, header promises {8 + header_len + end})"
        )
    return header


def load_tensors(files: list[Path], role: str) -> dict[str, mx.array]:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise MTPError(f"{role} weights '{f}' could not be read ({e})") from None
    return weights
