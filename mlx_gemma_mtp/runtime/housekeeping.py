"""Apple GPU housekeeping, done as mlx-lm does it (each call is a no-op on a CPU).

- Generation runs on mlx-lm's dedicated generation stream (one per thread), so the engine's
  rounds do not queue behind other work on the default stream.
- While generating, the wired-memory limit is raised to the GPU's recommended working set, so
  Metal keeps the weights resident instead of paging them between rounds; mlx-lm's own helper warns
  when the weights come close to that size.
- MLX keeps freed buffers for reuse; a long-running server releases them when it falls idle, and a
  long generation every `RELEASE_EVERY` rounds, so memory freed by a finished request goes back.
"""

import contextlib

import mlx.core as mx
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.utils import maybe_set_recommended_wired_limit

RELEASE_EVERY = 256  # rounds between releases of MLX's buffer cache (mlx-lm: every 256 tokens)

__all__ = ["generation_stream", "generating", "keep_weights_wired", "release_cache", "RELEASE_EVERY"]


@contextlib.contextmanager
def generating(model):
    """Around one call's generation: the wired limit raised for `model`'s weights (restored after)."""
    with wired_limit(model, [generation_stream]):
        yield


def keep_weights_wired() -> None:
    """For a process that generates until it ends (the server): raise the wired limit once."""
    maybe_set_recommended_wired_limit()


def release_cache() -> None:
    mx.clear_cache()
