"""The images of a chat request: OpenAI `image_url` content parts, as bytes.

data: URLs are decoded; http(s) URLs are fetched with a size and a time limit; local files (a
path or a file: URL) only when the server was started with --allow-local-images. Whatever goes
wrong is one line (an MTPError), which the handler answers with a 400.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from mlx_gemma_mtp.errors import MTPError

MAX_IMAGE_BYTES = 20 << 20  # --max-image-bytes' default (OpenAI's limit per image)
FETCH_TIMEOUT = 10.0  # --image-fetch-timeout's default, seconds


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = MAX_IMAGE_BYTES
    fetch_timeout: float = FETCH_TIMEOUT
    allow_local: bool = False  # file paths and file: URLs (a local client's own files)
    allow_remote: bool = True  # http(s) URLs


def image_bytes(url: str, policy: ImagePolicy) -> bytes:
    """The bytes an image_url names."""
    if not isinstance(url, str) or not url:
        raise MTPError("image_url.url must be a non-empty string")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        return data_url_bytes(url, policy.max_bytes)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MTPError("this server does not fetch image URLs: send the image as a data: URL")
        return fetch(url, policy)
    if scheme in ("file", "") or (len(scheme) == 1 and os.name == "nt"):
        if not policy.allow_local:
            raise MTPError("local image files are refused (start the server with --allow-local-images)")
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if scheme == "file" else url
        if os.path.isfile(path) and os.path.getsize(path) > policy.max_bytes:
            raise MTPError(f"image '{path}' is over {policy.max_bytes} bytes")
        return path  # the processor reads it, with its own one-line errors
    raise MTPError(f"image_url must be a data:, http: or https: URL, got '{scheme}:'")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    head, comma, payload = url.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise MTPError("an image data: URL must be base64: data:image/png;base64,...")
    if len(payload) * 3 // 4 > max_bytes:
        raise MTPError(f"the image is over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MTPError("the image data: URL is not valid base64") from None


def fetch(url: str, policy: ImagePolicy) -> bytes:
    """GET `url`, refusing more than max_bytes and giving up after fetch_timeout seconds."""
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-gemma-mtp"})
    try:
        with urllib.request.urlopen(request, timeout=policy.fetch_timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise MTPError(f"the image at {url} is over {policy.max_bytes} bytes")
            data = response.read(policy.max_bytes + 1)
    except MTPError:
        raise
    except urllib.error.HTTPError as e:
        raise MTPError(f"the image at {url} could not be fetched: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise MTPError(f"the image at {url} could not be fetched: {reason}") from None
    if len(data) > policy.max_bytes:
        raise MTPError(f"the image at {url} is over {policy.max_bytes} bytes")
    return data
