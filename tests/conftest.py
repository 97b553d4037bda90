"""Shared fixtures: miniature Gemma 4 checkpoints built once per test session."""

from __future__ import annotations

import pytest
import torch

import reference_models

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
