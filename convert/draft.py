"""Drafter quantization, in the mlx-community layout (Hugging Face names, `quantization` in config)."""

import copy

import mlx.nn as nn


def quantize_drafter(model: nn.Module, config: dict, spec) -> dict:
    """Quantize the drafter's linear layers and tied head; returns the config to save with it."""

    def predicate(path: str, module: nn.Module) -> bool:
        # The centroid router picks which tokens get scored at all: keep it exact (it is tiny).
        if path.endswith("masked_embedding.centroids"):
            return False
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % spec.group_size == 0

    nn.quantize(model, spec.group_size, spec.bits, mode=spec.mode, class_predicate=predicate)
    config = copy.deepcopy(config)
    config["quantization"] = {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}
    config["quantization_config"] = dict(config["quantization"])
    return config
