"""The target's KV caches: B rows, each with its own length as an array on the device.

A round writes each row's verified entries at that row's offset, and acceptance moves the offset
on the device: a rejected draft's entries stay in the buffer, masked, and are overwritten by the
next round. Rolling back is moving an offset, so the host never has to read a round before it
queues the next one, and rows of one batch accept different counts in the same round.

Full-attention layers keep every token in a buffer that grows in steps. Sliding layers keep a
ring of `window + RING_SLACK` entries: the entry for position p lives in slot p % size, so a
rollback at any length of context is moving the offset (mlx-lm's rotating cache cannot be rolled
back once it wraps, the failure other runtimes hit after the first window). Attention
masks come from the offsets: which slot holds which position, and what each query may see.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlx_gemma_mtp.limits import MAX_DRAFT_TOKENS

# Ring entries beyond the sliding window: a round writes up to MAX_DRAFT_TOKENS + 1 entries, and
# the engine may roll a row back over two rounds (one more round was queued before the row's stop
# was read); the rest lets a reused prompt cache drop a few tokens (a re-rendered chat turn).
RING_SLACK = 2 * (MAX_DRAFT_TOKENS + 1) + 64
GROW_STEP = 256


@dataclass(frozen=True)
class Blocks:
    """Image blocks of one prefill forward whose tokens attend to each other both ways (Gemma 4's
    bidirectional vision attention). Only a prefill sets them: decoding steps stay causal."""

    spans: tuple  # (start, end) positions of each image's tokens, all inside the forward
    every_layer: bool  # the 12B: full layers too, and past the window; towers: sliding layers only

    def same(self, queries: mx.array, keys: mx.array) -> mx.array:
        """[B, 1, n, T]: query and key positions in one block."""
        q, k = self._ids(queries)[:, :, None], self._ids(keys)[:, None, :]
        return ((q == k) & (q >= 0))[:, None]

    def _ids(self, positions: mx.array) -> mx.array:
        ids = mx.full(positions.shape, -1, mx.int32)
        for i, (start, end) in enumerate(self.spans):
            ids = mx.where((positions >= start) & (positions < end), i, ids)
        return ids


class _Buffers:
    keys = values = offset = None
    blocks: Optional[Blocks] = None  # set for one prefill forward over images (set_blocks)

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class FullCache(_Buffers):
    """A full-attention layer's K/V [B, heads, capacity, dim]; row b holds `offset[b]` tokens."""

    def __init__(self, batch: int = 1):
        self.keys = None
        self.values = None
        self.offset = mx.zeros((batch,), mx.int32)
        self.capacity = 0  # entries per row; the buffers are allocated on the first write

    def reserve(self, size: int) -> None:
        """Make room for `size` tokens per row (the caller knows an upper bound of every offset);
        before a forward, as its masks are made before its writes."""
        if size <= self.capacity:
            return
        extra = -(-(size - self.capacity) // GROW_STEP) * GROW_STEP
        self.capacity += extra
        if self.keys is not None:
            B, heads, _, k_dim = self.keys.shape
            self.keys = mx.concatenate([self.keys, mx.zeros((B, heads, extra, k_dim), self.keys.dtype)], axis=2)
            v_dim = self.values.shape[3]
            self.values = mx.concatenate([self.values, mx.zeros((B, heads, extra, v_dim), self.values.dtype)], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write each row's N new entries at its offset; return the whole buffers (masked by
        `make_mask`)."""
        B, heads, n, k_dim = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, heads, self.capacity, k_dim), keys.dtype)
            self.values = mx.zeros((B, heads, self.capacity, values.shape[3]), values.dtype)
        at = (self.offset[:, None] + mx.arange(n))[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        self.offset = self.offset + n
        return self.keys, self.values

    def make_mask(self, n: int, window_size=None, return_array: bool = False) -> mx.array:
        """[B, 1, n, capacity]: query i of row b (position offset[b] + i) sees entries 0..that."""
        queries = self.offset[:, None] + mx.arange(n)
        mask = (mx.arange(self.capacity)[None, None] <= queries[:, :, None])[:, None]
        if self.blocks is not None and self.blocks.every_layer:
            mask = mask | self.blocks.same(queries, mx.arange(self.capacity)[None])
        return mask

    def visible(self) -> mx.array:
        """[B, 1, 1, capacity]: the entries of accepted tokens (what the drafter reads)."""
        return (mx.arange(self.capacity)[None] < self.offset[:, None])[:, None, None]


class SlidingCache(_Buffers):
    """A sliding layer's ring [B, heads, window + RING_SLACK, dim]: position p in slot p % size."""

    def __init__(self, window: int, batch: int = 1):
        self.window = window
        self.size = window + RING_SLACK
        self.keys = None
        self.values = None
        self.offset = mx.zeros((batch,), mx.int32)

    def positions(self) -> mx.array:
        """[B, size]: the position each slot holds, the latest one below the row's offset
        (negative: never written). A slot may hold a rejected entry past the offset instead, but
        only where the position named here is out of every query's window."""
        last = self.offset[:, None] - 1
        return last - (last - mx.arange(self.size)[None]) % self.size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Return [ring before this write, the N new entries] (masked by `make_mask`), then write
        the last min(N, size) new entries into the ring."""
        B, heads, n, k_dim = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, heads, self.size, k_dim), keys.dtype)
            self.values = mx.zeros((B, heads, self.size, values.shape[3]), values.dtype)
        out = mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)
        keep = min(n, self.size)
        slots = ((self.offset[:, None] + mx.arange(n - keep, n)) % self.size)[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, slots, keys[..., n - keep :, :], axis=2)
        self.values = mx.put_along_axis(self.values, slots, values[..., n - keep :, :], axis=2)
        self.offset = self.offset + n
        return out

    def make_mask(self, n: int, window_size=None, return_array: bool = False) -> mx.array:
        """[B, 1, n, size + n] for `update_and_fetch`'s [ring, new]: a query at position q sees
        the positions q - window < p <= q."""
        queries = self.offset[:, None] + mx.arange(n)  # [B, n]
        keys = mx.concatenate([self.positions(), queries], axis=1)[:, None, :]  # [B, 1, size + n]
        q = queries[:, :, None]
        causal, window = (keys <= q)[:, None], ((keys > q - self.window) & (keys >= 0))[:, None]
        if self.blocks is None:
            return causal & window
        same = self.blocks.same(queries, keys[:, 0])
        # the 12B ORs a block in after the window; the towers' blocks stay inside it
        return (causal & window) | same if self.blocks.every_layer else (causal | same) & window

    def visible(self, n: int) -> mx.array:
        """[B, 1, 1, size]: the last `n` accepted positions of each row (what the drafter reads)."""
        p = self.positions()
        return ((p >= self.offset[:, None] - n) & (p >= 0))[:, None, None]


def make_target_cache(args, batch: int = 1) -> list:
    """One cache per non-KV-shared target layer."""
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    return [
        FullCache(batch) if kind == "full_attention" else SlidingCache(args.sliding_window, batch)
        for kind in args.layer_types[:first_shared]
    ]


def set_blocks(cache: list, blocks: Optional[Blocks]) -> None:
    """Image blocks for the next forward's masks (None: causal again)."""
    for c in cache:
        c.blocks = blocks


def set_offset(cache: list, offset: mx.array) -> None:
    for c in cache:
        c.offset = offset


def reserve(cache: list, size: int) -> None:
    """Room for `size` tokens in every row of the full layers (sliding rings never grow)."""
    for c in cache:
        if isinstance(c, FullCache):
            c.reserve(size)


def take_rows(cache: list, rows: mx.array) -> list:
    """A new cache list holding `rows` (indices) of `cache`."""
    out = []
    for c in cache:
        if hasattr(c, "take"):  # quantized_cache.py's layouts copy themselves
            out.append(c.take(rows))
            continue
        new = FullCache() if isinstance(c, FullCache) else SlidingCache(c.window)
        if c.keys is not None:
            new.keys, new.values = mx.take(c.keys, rows, axis=0), mx.take(c.values, rows, axis=0)
        if isinstance(c, FullCache):
            new.capacity = c.capacity
        new.offset = mx.take(c.offset, rows, axis=0)
        out.append(new)
    return out


def concat_rows(caches: list) -> list:
    """One cache list holding the rows of several (same model); full buffers padded to the longest."""
    out = []
    for layer in zip(*caches):
        first = layer[0]
        new = FullCache() if isinstance(first, FullCache) else SlidingCache(first.window)
        filled = [c for c in layer if c.keys is not None]
        if len(filled) != len(layer):
            raise ValueError("every row must be prefilled before it joins a batch")
        quantized = next((c for c in layer if hasattr(c, "concat")), None)
        if quantized is not None:  # quantized_cache.py: float rows joining are quantized
            out.append(quantized.concat(layer))
            continue
        if isinstance(first, FullCache):
            size = max(c.capacity for c in layer)
            for c in layer:
                c.reserve(size)
            new.capacity = size
        new.keys = mx.concatenate([c.keys for c in layer], axis=0)
        new.values = mx.concatenate([c.values for c in layer], axis=0)
        new.offset = mx.concatenate([c.offset for c in layer], axis=0)
        out.append(new)
    return out


def cache_bytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


# How far a settled row (its cache written at most two rounds past its offset) can move back and
# still hold every entry the drafter reads: a reused prompt cache drops at most this many tokens.
REUSE_ROLLBACK = RING_SLACK - 2 * (MAX_DRAFT_TOKENS + 1) - 1
