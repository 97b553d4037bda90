"""Gemma 4 with multi-token-prediction (MTP) speculative decoding on MLX."""

__version__ = "0.1.0"

__all__ = [
    "load", "generate", "stream_generate", "batch_generate", "make_prompt_cache", "Response", "BatchResponse",
    "Pair", "PromptCache", "Stats", "load_demo",
]

_HOMES = {"load": "model.loading", "generate": "api", "stream_generate": "api", "Response": "api",
          "batch_generate": "api", "BatchResponse": "api", "load_demo": "model.demo"}


def __getattr__(name):
    # Imported on first use, so `gemma-mtp --help` and the converter do not pay for mlx-lm's
    # tokenizer stack (transformers) before they need it.
    if name not in __all__:
        raise AttributeError(f"module 'mlx_gemma_mtp' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES.get(name, 'runtime.pair')}", __name__), name)
