"""Images in a prompt: where each one sits, what key the prompt cache holds for it, and its soft
tokens, encoded once per content.

A prompt with images is token ids in which each image is `boi + image_token x N + eoi`, plus one
`ImageSpan` per image: its position and its prepared pixels. Prefill feeds the target the image's
soft tokens at those N positions (engine.py, target.py). For the prompt cache, those positions hold
the image's content key (a negative number, never a token id) instead of the image token, so a
cached prefix is reused only where the same pixels sit at the same place.

`ImageEncoder` (one per loaded pair) loads the vision model on the first image, never for text,
and keeps the soft tokens of recent images by content key, so a chat's next turn about the same
picture encodes nothing (and with its prefix cached, prefills nothing of it either).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlx_gemma_mtp.errors import MTPError

SOFT_TOKEN_CACHE_BYTES = 256 << 20  # encoded images kept by content (a 1120-token 31B image: 12 MB)


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """One image of a prompt: its N image tokens are prompt positions start .. start + N."""

    start: int
    image: object  # vision.PreparedImage
    key: int  # content key: what the prompt cache holds at its positions

    @property
    def end(self) -> int:
        return self.start + self.image.num_soft_tokens


def content_key(image) -> int:
    """A negative number from the prepared pixels and their layout (never a token id)."""
    h = hashlib.sha256()
    for part in (image.pixel_values, image.positions):
        h.update(str(part.shape).encode())
        h.update(part.tobytes())
    return -1 - (int.from_bytes(h.digest()[:8], "little") >> 1)


def cache_keys(ids: list, spans: tuple) -> list:
    """The prompt as the prompt cache keys it: image positions hold their image's content key."""
    keys = list(ids)
    for span in spans:
        keys[span.start : span.end] = [span.key] * (span.end - span.start)
    return keys


def spans_in(spans: tuple, start: int, end: int) -> list:
    """The spans that lie in positions start .. end (prefill never splits one)."""
    return [s for s in spans if start <= s.start and s.end <= end]


def chunk_end(spans: tuple, start: int, end: int) -> int:
    """Where a prefill chunk meant to cover start .. end ends so that no image is cut: before an
    image it would cut, or after it when the chunk starts at that image (one image, one forward)."""
    for s in spans:
        if s.start < end < s.end:
            return s.start if s.start > start else s.end
    return end


@dataclass(frozen=True)
class VisionInfo:
    """What a checkpoint says about its images, read from its config (no weights loaded)."""

    token_ids: object  # vision.ImageTokenIds
    geometry: object  # vision.PatchGeometry
    every_layer_blocks: Optional[bool]  # None: causal; True: the 12B's blocks; False: the towers'
    pad_id: int  # the id image positions take for the token embeddings (E2B/E4B per-layer inputs)


class ImageEncoder:
    """A pair's images: preparing (Pillow, any thread), and encoding (the engine's thread), with
    the vision model loaded on the first encode and soft tokens kept by content key."""

    def __init__(self, folder: Path, max_bytes: int = SOFT_TOKEN_CACHE_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.load_seconds: Optional[float] = None  # what loading the vision model took
        self._info: Optional[VisionInfo] = None
        self._model = None
        self._soft: OrderedDict = OrderedDict()  # content key -> soft tokens, least recent first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def info(self) -> VisionInfo:
        """The checkpoint's image settings; MTPError if it has no vision tower."""
        if self._info is None:
            from mlx_gemma_mtp.model.checkpoint import check_safetensors, read_config, weight_files
            from mlx_gemma_mtp.vision import ImageTokenIds, PatchGeometry
            from mlx_gemma_mtp.vision.model import is_vision_tensor

            config = read_config(self.folder, "model")
            has_weights = config.get("vision_config") and any(
                is_vision_tensor(n) for f in weight_files(self.folder, "model") for n in check_safetensors(f, "model"))
            if not has_weights:
                raise MTPError(f"the model in '{self.folder}' has no vision tower: it takes no images")
            text = config.get("text_config") or {}
            unified = config.get("model_type") == "gemma4_unified"
            mode = text.get("use_bidirectional_attention", "vision" if unified else None)
            self._info = VisionInfo(ImageTokenIds.from_config(config), PatchGeometry.from_config(config),
                                    None if mode != "vision" else unified, int(text.get("pad_token_id", 0)))
        return self._info

    def prepare(self, image, max_soft_tokens: int):
        """(PreparedImage, content key) for an image given as bytes, a path or a PIL image."""
        from mlx_gemma_mtp.vision import prepare

        prepared = prepare(image, max_soft_tokens, self.info.geometry)
        return prepared, content_key(prepared)

    def soft_tokens(self, span: ImageSpan):
        """The span's soft tokens [N, hidden], from the cache or encoded now."""
        with self._lock:
            if span.key in self._soft:
                self._soft.move_to_end(span.key)
                return self._soft[span.key]
        [soft] = self.model().encode([span.image])
        with self._lock:
            if span.key not in self._soft:
                self._soft[span.key] = soft
                self._bytes += soft.nbytes
            while self._bytes > self.max_bytes and len(self._soft) > 1:
                _, old = self._soft.popitem(last=False)
                self._bytes -= old.nbytes
        return soft

    def model(self):
        """The vision model, loaded on first use."""
        if self._model is None:
            from mlx_gemma_mtp.vision import load_vision

            self.info  # noqa: B018  (a folder without vision fails here, with its one line)
            start = time.perf_counter()
            self._model = load_vision(self.folder)
            self.load_seconds = time.perf_counter() - start
            if self._model is None:
                raise MTPError(f"the model in '{self.folder}' has no vision weights: it takes no images")
        return self._model
