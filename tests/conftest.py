"""Shared fixtures: miniature Gemma 4 checkpoints built once per test session."""

from __future__ import annotations

import pytest
import torch

import reference_models
from mlx_gemma_mtp import load
from mlx_gemma_mtp.convert import QuantSpec, convert

# The reference models are tiny: intra-op threads cost more than they save, and on a shared
# 2-core machine they contend with everything else (measured 3-8x slower with the default).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_pair(tmp_path_factory):
    """Factory: reference_pair(variant, config_style="google") -> (target_dir, draft_dir).

    Each (variant, style) is built once per session; treat the folders as read-only.
    """
    cache: dict[tuple[str, str], tuple] = {}

    def make(variant: str, config_style: str = "google"):
        key = (variant, config_style)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"gemma4-{variant}-{config_style}")
            cache[key] = reference_models.build_pair(variant, root, config_style=config_style)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def mlx_community_drafter(reference_pair, tmp_path_factory):
    """Factory: mlx_community_drafter(variant, bits=4, config_style="google") -> quantized drafter dir."""
    cache: dict[tuple[str, int, str], object] = {}

    def make(variant: str, bits: int = 4, config_style: str = "google"):
        key = (variant, bits, config_style)
        if key not in cache:
            _, draft_dir = reference_pair(variant, config_style)
            out = tmp_path_factory.mktemp(f"mlx-community-{variant}-{bits}bit-{config_style}")
            cache[key] = reference_models.write_mlx_community_drafter(draft_dir, out / "drafter", bits=bits)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def pair_dir(reference_pair, tmp_path_factory):
    """pair_dir(variant, bits=None) -> converted pair folder (float32, or target quantized)."""
    cache = {}

    def make(variant, bits=None):
        if (variant, bits) not in cache:
            target, draft = reference_pair(variant)
            out = tmp_path_factory.mktemp("engine") / f"{variant}-{bits}"
            quant = QuantSpec(bits, 64, "affine") if bits else None
            convert(str(target), out, draft=str(draft), quantization=quant, dtype="float32", progress=False)
            cache[(variant, bits)] = out
        return cache[(variant, bits)]

    return make


@pytest.fixture(scope="session")
def loaded(pair_dir):
    cache = {}

    def make(variant, bits=None):
        if (variant, bits) not in cache:
            cache[(variant, bits)] = load(str(pair_dir(variant, bits)))
        return cache[(variant, bits)]

    return make


@pytest.fixture(scope="module")
def launch_lock(tmp_path_factory):
    """Held by a test module that starts `mlx.launch` rings, for the whole module: the test files
    run on two workers, and two rings starting at once race for their ports."""
    import fcntl

    lock = tmp_path_factory.getbasetemp().parent / "mlx-launch.lock"  # shared by the workers
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
