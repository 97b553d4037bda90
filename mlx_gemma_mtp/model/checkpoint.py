"""The on-disk format, in one place: the pair manifest, where a checkpoint comes from (a folder or
a Hub repo id), its config and safetensors (checked before use), the atomic output folder, and
float casting.

A pair folder (what `gemma-mtp convert` writes):

    DIR/target/   an mlx-lm model folder
    DIR/draft/    the drafter: Hugging Face tensor names, safetensors + config.json
    DIR/mtp.json  the manifest: {"format", "created_with", "target": PART, "draft": PART or null},
                  PART = {"path", "source", "model_type", "dtype", "quantization", "bits_per_weight"}
"""

import errno
import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_map

from mlx_gemma_mtp.errors import MTPError

MANIFEST = "mtp.json"
FORMAT = "mlx-gemma-mtp/1"
NONE = type(None)
# the manifest's part fields and their JSON types; only `path` is required
PART_FIELDS = {
    "path": str,
    "source": (str, NONE),
    "model_type": str,
    "dtype": str,
    "quantization": (dict, NONE),
    "bits_per_weight": (int, float),
}

# Files a text-generation conversion needs; towers' processors and the like are skipped.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# --- JSON and configs --------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; anything else is an MTPError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MTPError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise MTPError(f"cannot read {what} '{path}': {cause(e)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MTPError(f"{what} '{path}' is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MTPError(f"{what} '{path}' is not a JSON object")
    return data


def read_config(folder: Path, role: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MTPError(f"{role} folder '{folder}' has no config.json: not a model folder")
    return read_json(path, f"{role} config")


def with_dtype(config: dict, dtype: str) -> dict:
    """`config` saying the dtype its weights were saved in (the source's may differ)."""
    out = dict(config)
    out["dtype"] = dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    text = out.get("text_config")
    if isinstance(text, dict) and ("dtype" in text or "torch_dtype" in text):
        out["text_config"] = with_dtype(text, dtype)
    return out


# --- the manifest ------------------------------------------------------------------------------


def write_manifest(folder: Path, created_with: str, target: dict, draft: Optional[dict]) -> dict:
    manifest = {"format": FORMAT, "created_with": created_with, "target": target, "draft": draft}
    check_manifest(manifest, Path(folder) / MANIFEST)
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    """The checked manifest of a pair folder: `draft` is None or a part like `target`."""
    path = Path(folder) / MANIFEST
    manifest = read_json(path, "pair manifest")
    check_manifest(manifest, path)
    return {**manifest, "draft": manifest.get("draft")}


def check_manifest(manifest: dict, path: Path) -> None:
    def bad(why):
        raise MTPError(f"pair manifest '{path}' is invalid: {why}")

    for name in ("target", "draft"):
        part = manifest.get(name)
        if part is None and name == "draft":
            continue
        if not isinstance(part, dict):
            bad(f"'{name}' must be an object")
        for key, kind in PART_FIELDS.items():
            value = part.get(key)
            if key in part and (not isinstance(value, kind) or isinstance(value, bool)):
                bad(f"'{name}.{key}' has the wrong type ({type(value).__name__})")
        sub = part.get("path")
        if not sub:
            bad(f"'{name}.path' is missing")
        if Path(sub).is_absolute() or ".." in Path(sub).parts:
            bad(f"'{name}.path' must be a folder inside the pair, got '{sub}'")


def source_record(src: Union[str, Path]) -> str:
    """What a manifest records of where a part came from: a hub id as is, a local folder by its
    name only (an absolute path would describe the machine that converted it)."""
    path = Path(src).expanduser()
    return path.resolve().name if path.is_dir() else str(src)


# --- where a checkpoint comes from -------------------------------------------------------------


def resolve_source(src, role: str, patterns: list = DOWNLOAD_PATTERNS) -> Path:
    """A local folder holding the checkpoint `src`, downloading a hub id (only `patterns`) if needed."""
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if not isinstance(src, str) or not src.strip():
        raise MTPError(f"{role} must be a folder or a Hugging Face repo id, got {src!r}")
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MTPError(f"{role} '{src}' is a file, not a checkpoint folder")
    if not _REPO_ID.match(src):
        raise MTPError(f"{role} '{src}' is neither a folder nor a Hugging Face repo id")
    return _download(src, role, patterns)


def pair_folders(model, draft_path=None, draft: bool = True) -> tuple[Path, Optional[Path]]:
    """(target folder, drafter folder or None) of a pair folder, a plain target folder or a hub id
    of either. With draft=False the drafter is neither resolved nor downloaded; `draft_path`
    replaces the pair's own drafter."""
    if not draft and draft_path is not None:
        raise MTPError("a drafter was given and draft=False: choose one")
    folder = resolve_source(model, "model", [MANIFEST])  # a hub id: the manifest alone, if any
    if not has_manifest(folder):
        return resolve_source(model, "model"), _drafter(draft_path, draft)
    manifest = read_manifest(folder)
    own_draft = draft and draft_path is None and manifest["draft"] is not None
    parts = [manifest["target"]["path"]] + ([manifest["draft"]["path"]] if own_draft else [])
    folder = resolve_source(model, "model", [f"{p}/{pattern}" for p in parts for pattern in DOWNLOAD_PATTERNS])
    target = folder / manifest["target"]["path"]
    if own_draft:
        return target, folder / manifest["draft"]["path"]
    return target, _drafter(draft_path, draft)


def _drafter(draft_path, draft: bool) -> Optional[Path]:
    return resolve_source(draft_path, "drafter") if draft and draft_path is not None else None


def _download(repo_id: str, role: str, patterns: list) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise MTPError(
            f"{role} repo '{repo_id}' is gated: accept its license on the Hub and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise MTPError(f"{role} repo '{repo_id}' was not found on the Hugging Face Hub") from None
    except RevisionNotFoundError:
        raise MTPError(f"{role} repo '{repo_id}' has no such revision") from None
    except LocalEntryNotFoundError:
        raise MTPError(
            f"cannot download {role} repo '{repo_id}': the Hub is unreachable and the repo "
            "is not in the local Hugging Face cache"
        ) from None
    except OSError as e:
        raise MTPError(f"cannot download {role} repo '{repo_id}': {e}") from None


# --- safetensors -------------------------------------------------------------------------------


def weight_files(folder: Path, role: str) -> list[Path]:
    """The safetensors files of a checkpoint (its index's, or every one), each checked complete."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, f"{role} index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MTPError(f"{role} index '{index}' is corrupt (no weight_map of file names)")
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
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
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
        except (RuntimeError, ValueError, OSError) as e:
            raise MTPError(f"{role} weights '{f}' could not be read ({e})") from None
    return weights


def cast_floats(tree, dtype: mx.Dtype):
    """Every floating-point array of `tree` (an array, a dict or a parameter tree) in `dtype`;
    integer arrays (token orderings, quantized weights) stay as they are."""
    return tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, tree)


# --- the output folder -------------------------------------------------------------------------


def cause(e: OSError) -> str:
    """An OSError's reason in words, without the file name (the caller names the user's path)."""
    if e.errno:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


def _write_error(out: Path, e: OSError) -> MTPError:
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        file = next((p for p in [out, *out.parents] if p.is_file()), None)
        if file is not None:
            return MTPError(f"cannot write '{out}': '{file}' is a file, not a folder")
    if e.errno == errno.ENOENT and out.parent.is_dir():
        return MTPError(f"cannot write '{out}': '{out.parent}' does not allow new folders")
    return MTPError(f"cannot write '{out}': {cause(e)}")


def _missing_parents(out: Path) -> list[Path]:
    missing = []
    for p in out.parents:
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing  # deepest first


def _remove(tmp: Optional[Path], parents: list[Path]) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in parents:
        try:
            p.rmdir()
        except OSError:
            break


def _partial_folder(out: Path, force: bool) -> tuple[Path, list[Path]]:
    if out.exists() and not force:
        raise MTPError(f"output '{out}' already exists (use --force to replace it)")
    parents = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result should not be
    except OSError as e:
        _remove(None, parents)
        raise _write_error(out, e) from None
    return tmp, parents


def check_output(out: Union[str, Path], force: bool) -> None:
    """MTPError now, rather than after a long run, when `out` exists (without force) or cannot
    be written; leaves nothing behind."""
    tmp, parents = _partial_folder(Path(out).expanduser(), force)
    _remove(tmp, parents)


@contextmanager
def output_folder(out: Union[str, Path], force: bool):
    """Yield a hidden folder beside `out` to build it in; when the block ends it becomes `out`
    (replacing an old one only if `force`). On any failure nothing is left behind, and a failed
    write is an MTPError naming `out` and the cause (e.g. no space left on device)."""
    out = Path(out).expanduser()
    tmp, parents = _partial_folder(out, force)
    try:
        yield tmp
        replace_dir(tmp, out)
    except OSError as e:
        _remove(tmp, parents)
        raise _write_error(out, e) from None
    except BaseException:
        _remove(tmp, parents)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing one (allowed by --force) goes only after."""
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}.old"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # put the old one back
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)
