"""Antialiased bicubic resizing of uint8 images in fixed point: the arithmetic of torch's uint8
resize, which transformers' torchvision-backed image processors call (the 12B's processor has
no other backend), so an image resized here is bit-identical to one resized there.

Per axis, each output pixel's taps are the Keys cubic (a = -0.5) widened by the downscale
factor and normalized to sum to 1, then rounded to int16 at the largest precision that keeps
every weight of the axis under 2^15. A pass sums weight x pixel in int32, rounds, shifts the
precision back out and clips to 0..255. Width is resized first, then height, through a uint8
image in between. Pillow's bicubic uses the same filter with 22-bit weights and, for some
shapes, the other pass order: on noise images it lands up to 22/255 away from this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CUBIC_A = -0.5  # Keys' parameter, as in Pillow and torch's antialiased bicubic


def cubic(x: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel, in the same float64 operations as torch."""
    a = CUBIC_A
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@dataclass(frozen=True)
class AxisTaps:
    """Output pixel i reads inputs first[i] + k for k < taps, weighted by weights[i, k] / 2^precision."""

    first: np.ndarray  # int64 [out]
    weights: np.ndarray  # int32 [out, taps], zero past each pixel's own count
    precision: int


def axis_taps(size_in: int, size_out: int) -> AxisTaps:
    scale = size_in / size_out
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the kernel's half-width, in input pixels
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(size_out) + 0.5)
    # C casts truncate toward zero
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    end = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), size_in)
    count = np.clip(end - first, 0, taps)

    k = np.arange(taps)
    w = cubic((k[None, :] + first[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(k[None, :] < count[:, None], w, 0.0)
    total = np.zeros(size_out)
    for j in range(taps):  # summed in tap order, as torch does (numpy's sum pairs terms up)
        total = total + w[:, j]
    w = w / np.where(total == 0.0, 1.0, total)[:, None]

    # the largest precision (at most 22 bits) at which the largest weight still fits in int16
    largest = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    fixed = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int32)
    return AxisTaps(first, fixed, precision)


def resample_last_axis(pixels: np.ndarray, taps: AxisTaps) -> np.ndarray:
    """One pass along the last axis of a uint8 array (contiguous there: gathers stay cheap)."""
    size_in = pixels.shape[-1]
    acc = np.full(pixels.shape[:-1] + (len(taps.first),), 1 << (taps.precision - 1), np.int32)
    for k in range(taps.weights.shape[1]):
        source = np.minimum(taps.first + k, size_in - 1)  # past a pixel's count its weight is 0
        acc += np.take(pixels, source, axis=-1) * taps.weights[:, k]
    return np.clip(acc >> taps.precision, 0, 255).astype(np.uint8)


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C]: width first, then height."""
    planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # [C, H, W]
    if planes.shape[2] != width:
        planes = resample_last_axis(planes, axis_taps(planes.shape[2], width))
    if planes.shape[1] != height:
        columns = np.ascontiguousarray(planes.transpose(0, 2, 1))  # [C, W, H]
        planes = resample_last_axis(columns, axis_taps(planes.shape[1], height)).transpose(0, 2, 1)
    return np.ascontiguousarray(planes.transpose(1, 2, 0))
