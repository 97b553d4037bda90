"""KV caches the speculative loop can always roll back.

mlx-lm's RotatingKVCache cannot be trimmed once it has wrapped, which is what makes other
runtimes corrupt their output or fall back to plain decoding after the first window. Here a
sliding layer keeps a linear buffer of the last `window - 1 + slack` tokens: any round can
remove up to `slack` tokens and still see a whole window. Old tokens are dropped in bulk every
`step` appends, so decoding does not copy the window at every token.
"""

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache


class SlidingKVCache:
    step = 256

    def __init__(self, window: int, slack: int = 64):
        self.window = window
        self.slack = slack
        self.keys = None
        self.values = None
        self.offset = 0  # absolute position of the next token
        self.end = 0  # buffer index of the next token

    @property
    def retained(self) -> int:
        return self.end

    def _reserve(self, n: int, like_k: mx.array, like_v: mx.array) -> None:
        if self.keys is not None and self.end + n <= self.keys.shape[2]:
            return
        keep = min(self.end, self.window - 1 + self.slack)
        B, heads, _, k_dim = like_k.shape
        capacity = keep + n + self.step
        keys = mx.zeros((B, heads, capacity, k_dim), like_k.dtype)
        values = mx.zeros((B, heads, capacity, like_v.shape[3]), like_v.dtype)
        if keep:
            keys[..., :keep, :] = self.keys[..., self.end - keep : self.end, :]
            values[..., :keep, :] = self.values[..., self.end - keep : self.end, :]
        self.keys, self.values, self.end = keys, values, keep

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append; return the last `window - 1` old tokens plus the new ones (what queries may see)."""
        n = keys.shape[2]
        self._reserve(n, keys, values)
        self.keys[..., self.end : self.end + n, :] = keys
        self.values[..., self.end : self.end + n, :] = values
        visible = min(self.end, self.window - 1) + n
        self.end += n
        self.offset += n
        return self.keys[..., self.end - visible : self.end, :], self.values[..., self.end - visible : self.end, :]

    def make_mask(self, n: int, window_size=None, return_array: bool = False):
        if n == 1:
            return None  # one query sees at most `window` keys: all of them
        return create_causal_mask(n, min(self.end, self.window - 1), window_size=self.window)

    def last(self, n: int):
        """K/V of the last `n` tokens (n <= window): what the drafter's sliding layers read."""
        n = min(n, self.end)
        return self.keys[..., self.end - n : self.end, :], self.values[..., self.end - n : self.end, :]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n > self.slack:
            raise ValueError(f"cannot roll back {n} tokens: slack is {self.slack}")
        n = min(n, self.end)
        self.end -= n
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_target_cache(args, slack: int) -> list:
    """One cache per non-KV-shared target layer: full layers grow, sliding layers roll back."""
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    return [
        KVCache() if kind == "full_attention" else SlidingKVCache(args.sliding_window, slack)
        for kind in args.layer_types[:first_shared]
    ]
