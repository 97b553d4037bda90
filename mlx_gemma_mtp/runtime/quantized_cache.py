"""A quantized KV cache: cache.py's full buffers and sliding rings, stored as affine-quantized
(packed, scales, biases) triples along the head dimension, as mlx-lm's QuantizedKVCache stores them.

Positions, per-row offsets on the device, masks and rollback are cache.py's: a write quantizes the
new entries and puts each triple's rows at each row's offset (full) or in slot p % size (sliding),
so moving an offset back is still a rollback at any length. mlx-lm's attention switches to its
quantized attention when the cache has `bits`; the KV-shared target layers and the drafter read
the producers' triples through `QuantizedRead`, which gives that attention the same settings.

A cache holds 2 * (bits / 16 + 2 / group_size) bytes per head-dim element against float16's 2 (8-bit,
group 64: 0.53x; 4-bit: 0.28x).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlx_gemma_mtp.runtime.cache import GROW_STEP, FullCache, SlidingCache
from mlx_gemma_mtp.errors import MTPError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVQuant:
    """The settings: `bits`, `group_size`, and `start` (quantize once the context passes it)."""

    bits: int
    group_size: int = 64
    start: int = 0


def check_kv_quant(kv_bits, kv_group_size=64, quantized_kv_start=0, args=None) -> Optional[KVQuant]:
    """The boundary's check of the three settings (MTPError with one line); None without kv_bits.
    With the target's `args`, every head dimension must split into whole groups."""

    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MTPError(f"{name} must be a whole number >= {low}, got {value!r}")

    whole("quantized_kv_start", quantized_kv_start, 0)
    if kv_group_size not in KV_GROUP_SIZES or isinstance(kv_group_size, bool):
        raise MTPError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {kv_group_size!r}")
    if kv_bits is None:
        return None
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise MTPError(f"kv_bits must be 4 or 8 (or None for a float cache), got {kv_bits!r}")
    if args is not None:
        dims = {args.head_dim, getattr(args, "global_head_dim", None) or args.head_dim}
        if any(d % kv_group_size for d in dims):
            raise MTPError(f"kv_group_size {kv_group_size} does not divide the target's head dimensions "
                           f"{sorted(dims)}; use a smaller one")
    return KVQuant(kv_bits, kv_group_size, quantized_kv_start)


def quantize(x: mx.array, q) -> tuple:
    return tuple(mx.quantize(x, group_size=q.group_size, bits=q.bits))


def dequantize(triple: tuple, q) -> mx.array:
    return mx.dequantize(*triple, group_size=q.group_size, bits=q.bits)


def _zeros(shape: tuple, dim: int, dtype, q) -> tuple:
    """An empty triple [*shape, dim] (all entries decode to 0)."""
    return (mx.zeros((*shape, dim * q.bits // 32), mx.uint32), mx.zeros((*shape, dim // q.group_size), dtype),
            mx.zeros((*shape, dim // q.group_size), dtype))


def _put(triple: tuple, at: mx.array, new: tuple) -> tuple:
    return tuple(mx.put_along_axis(t, at, n, axis=2) for t, n in zip(triple, new))


def _concat(triples: list, axis: int) -> tuple:
    return tuple(mx.concatenate(parts, axis=axis) for parts in zip(*triples))


def _take(triple: tuple, rows: mx.array) -> tuple:
    return tuple(mx.take(t, rows, axis=0) for t in triple)


def _slice(triple: tuple, start: int, stop: int) -> tuple:
    return tuple(t[..., start:stop, :] for t in triple)


def _dim(triple: tuple, q) -> int:
    return triple[0].shape[-1] * 32 // q.bits


class _Quantized:
    """What both quantized layouts share: the settings mlx-lm's attention reads, and the size."""

    @property
    def bits(self) -> int:
        return self.q.bits

    @property
    def group_size(self) -> int:
        return self.q.group_size

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(t.nbytes for t in (*self.keys, *self.values))

    def _fresh(self):
        raise NotImplementedError

    def take(self, rows: mx.array):
        new = self._fresh()
        if self.keys is not None:
            new.keys, new.values = _take(self.keys, rows), _take(self.values, rows)
        new.offset = mx.take(self.offset, rows, axis=0)
        return new


class QuantizedFullCache(_Quantized, FullCache):
    """FullCache with (packed, scales, biases) buffers [B, heads, capacity, *]."""

    def __init__(self, q: KVQuant, batch: int = 1):
        super().__init__(batch)
        self.q = q

    def _fresh(self):
        new = QuantizedFullCache(self.q)
        new.capacity = self.capacity
        return new

    def reserve(self, size: int) -> None:
        if size <= self.capacity:
            return
        extra = -(-(size - self.capacity) // GROW_STEP) * GROW_STEP
        self.capacity += extra
        if self.keys is not None:
            B, heads = self.keys[0].shape[:2]
            self.keys = _concat([self.keys, _zeros((B, heads, extra), _dim(self.keys, self.q), self.keys[1].dtype, self.q)], 2)
            self.values = _concat([self.values, _zeros((B, heads, extra), _dim(self.values, self.q), self.values[1].dtype, self.q)], 2)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, heads, n, _ = keys.shape
        if self.keys is None:
            self.keys = _zeros((B, heads, self.capacity), keys.shape[3], keys.dtype, self.q)
            self.values = _zeros((B, heads, self.capacity), values.shape[3], values.dtype, self.q)
        at = (self.offset[:, None] + mx.arange(n))[:, None, :, None]
        self.keys = _put(self.keys, at, quantize(keys, self.q))
        self.values = _put(self.values, at, quantize(values, self.q))
        self.offset = self.offset + n
        return self.keys, self.values

    @staticmethod
    def concat(layer: list) -> "QuantizedFullCache":
        q = next(c.q for c in layer if isinstance(c, _Quantized))
        layer = [c if isinstance(c, _Quantized) else from_float(c, q) for c in layer]
        size = max(c.capacity for c in layer)
        for c in layer:
            c.reserve(size)
        new = QuantizedFullCache(q)
        new.capacity = size
        new.keys, new.values = _concat([c.keys for c in layer], 0), _concat([c.values for c in layer], 0)
        new.offset = mx.concatenate([c.offset for c in layer], axis=0)
        return new


class QuantizedSlidingCache(_Quantized, SlidingCache):
    """SlidingCache with a (packed, scales, biases) ring: position p in slot p % size."""

    def __init__(self, window: int, q: KVQuant, batch: int = 1):
        super().__init__(window, batch)
        self.q = q

    def _fresh(self):
        return QuantizedSlidingCache(self.window, self.q)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, heads, n, _ = keys.shape
        if self.keys is None:
            self.keys = _zeros((B, heads, self.size), keys.shape[3], keys.dtype, self.q)
            self.values = _zeros((B, heads, self.size), values.shape[3], values.dtype, self.q)
        new_k, new_v = quantize(keys, self.q), quantize(values, self.q)
        out = _concat([self.keys, new_k], 2), _concat([self.values, new_v], 2)
        keep = min(n, self.size)
        slots = ((self.offset[:, None] + mx.arange(n - keep, n)) % self.size)[:, None, :, None]
        self.keys = _put(self.keys, slots, _slice(new_k, n - keep, n))
        self.values = _put(self.values, slots, _slice(new_v, n - keep, n))
        self.offset = self.offset + n
        return out

    @staticmethod
    def concat(layer: list) -> "QuantizedSlidingCache":
        q = next(c.q for c in layer if isinstance(c, _Quantized))
        layer = [c if isinstance(c, _Quantized) else from_float(c, q) for c in layer]
        new = QuantizedSlidingCache(layer[0].window, q)
        new.keys, new.values = _concat([c.keys for c in layer], 0), _concat([c.values for c in layer], 0)
        new.offset = mx.concatenate([c.offset for c in layer], axis=0)
        return new


def make_quantized_cache(args, q: KVQuant, batch: int = 1) -> list:
    """cache.make_target_cache, quantized: one cache per non-KV-shared target layer."""
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    return [
        QuantizedFullCache(q, batch) if kind == "full_attention" else QuantizedSlidingCache(args.sliding_window, q, batch)
        for kind in args.layer_types[:first_shared]
    ]


def from_float(c, q: KVQuant):
    """A quantized copy of one float layer cache (same offsets, same slots)."""
    if isinstance(c, FullCache):
        new = QuantizedFullCache(q)
        new.capacity = c.capacity
    else:
        new = QuantizedSlidingCache(c.window, q)
    if c.keys is not None:
        new.keys, new.values = quantize(c.keys, q), quantize(c.values, q)
    new.offset = c.offset
    return new


def is_quantized(cache: list) -> bool:
    return bool(cache) and isinstance(cache[0], _Quantized)


def quantize_cache(cache: list, q: KVQuant) -> list:
    """The cache list quantized (a list already quantized is returned as it is)."""
    return cache if is_quantized(cache) else [from_float(c, q) for c in cache]


class QuantizedRead:
    """Stands in for a cache in an attention call that only reads quantized K/V (the target's
    KV-shared layers, the drafter): it returns the triples unchanged and tells mlx-lm's
    attention their settings."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def update_and_fetch(self, keys, values):
        return keys, values


def reader_for(shared_kv: tuple, head_dim: int) -> Optional[QuantizedRead]:
    """A QuantizedRead for shared (keys, values) that are triples (settings read from their
    shapes, which are static under mx.compile), or None for float arrays."""
    keys = shared_kv[0]
    if not isinstance(keys, (tuple, list)):
        return None
    packed, scales = keys[0], keys[1]
    return QuantizedRead(packed.shape[-1] * 32 // head_dim, head_dim // scales.shape[-1])
