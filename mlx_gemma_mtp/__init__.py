"""Gemma 4 with multi-token-prediction (MTP) speculative decoding on MLX."""

__version__ = "0.1.0"
