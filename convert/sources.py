"""Where a checkpoint comes from: a local folder or a Hugging Face Hub repo id."""

import re
from pathlib import Path

from mlx_gemma_mtp.errors import MTPError

# Files a text-generation conversion needs; towers' processors and the like are skipped.
DOWNLOAD_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "*.txt",
]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_source(src: str, role: str) -> Path:
    """Return a local folder holding the checkpoint `src` (downloading a hub id if needed)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MTPError(f"{role} '{src}' is a file, not a checkpoint folder")
    if not _REPO_ID.match(src):
        raise MTPError(f"{role} '{src}' is neither a folder nor a Hugging Face repo id")
    return _download(src, role)


def _download(repo_id: str, role: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except GatedRepoError:
        raise MTPError(
            f"{role} repo '{repo_id}' is gated: accept its license on the Hub and log in "
            "(`hf auth login`)"
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
