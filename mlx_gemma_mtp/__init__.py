"""Gemma 4 with multi-token-prediction (MTP) speculative decoding on MLX."""

__version__ = "0.1.0"

from .api import Response, generate, load, stream_generate  # noqa: E402
from .decode import Pair, PromptCache, Stats, make_prompt_cache  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "make_prompt_cache", "Response", "Pair", "PromptCache", "Stats"]
