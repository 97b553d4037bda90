"""Config normalization and pair validation.

mlx-lm reads Gemma 4 configs with its own defaults, several of which differ from the
transformers defaults that decide what a checkpoint leaves out (num_kv_shared_layers 0 vs 20,
use_double_wide_mlp False vs True, final_logit_softcapping None vs 30, the layer pattern), and
it only knows `global_head_dim`, not the `per_layer_config` newer transformers writes. So every
field mlx-lm reads is written out explicitly, with transformers' meaning.
"""

import copy

from mlx_gemma_mtp.errors import MTPError

TARGET_TYPES = ("gemma4", "gemma4_unified", "gemma4_text")
DRAFT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")

# transformers' Gemma4TextConfig defaults for the fields mlx-lm's gemma4_text reads.
TEXT_DEFAULTS = {
    "vocab_size": 262144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "sliding_window": 512,
    "final_logit_softcapping": None,
    "vocab_size_per_layer_input": 262144,
    "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
    "global_head_dim": 512,
    "num_global_key_value_heads": None,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
}

# Gemma4UnifiedTextConfig has no per-layer inputs and no MoE, and other window/length defaults.
UNIFIED_TEXT_DEFAULTS = {
    **TEXT_DEFAULTS,
    "max_position_embeddings": 262144,
    "sliding_window": 1024,
    "vocab_size_per_layer_input": 0,
    "hidden_size_per_layer_input": 0,
}
UNIFIED_ONLY_ABSENT = ("enable_moe_block", "hidden_size_per_layer_input", "vocab_size_per_layer_input")


def default_layer_types(num_layers: int) -> list[str]:
    # transformers: every 6th layer is full attention, and the last one always is.
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]
    types[-1] = "full_attention"
    return types


def normalize_text_config(text: dict, unified: bool, role: str) -> dict:
    """Fill a Gemma 4 text config with transformers' defaults and resolve per-layer overrides."""
    defaults = UNIFIED_TEXT_DEFAULTS if unified else TEXT_DEFAULTS
    out = copy.deepcopy(text)
    if out.get("use_bidirectional_attention") == "all":
        raise MTPError(f"{role}: bidirectional Gemma 4 models (use_bidirectional_attention='all') are not supported")
    for key, value in defaults.items():
        if unified and key in UNIFIED_ONLY_ABSENT:
            out[key] = value  # these fields do not exist in the unified architecture
        elif out.get(key) is None and value is not None:
            out[key] = copy.deepcopy(value)
        else:
            out.setdefault(key, value)
    n = out["num_hidden_layers"]
    if out.get("layer_types") is None:
        out["layer_types"] = default_layer_types(n)
    elif len(out["layer_types"]) != n:
        raise MTPError(f"{role}: layer_types lists {len(out['layer_types'])} layers, config says {n}")

    # Newer transformers lists only the overrides that differ from head_dim/num_key_value_heads,
    # so an empty per_layer_config means full layers have the sliding layers' shape (not 512).
    per_layer = out.pop("per_layer_config", None)
    if per_layer is not None:
        _apply_per_layer_config(out, per_layer, role)
    return out


def _apply_per_layer_config(out: dict, per_layer: dict, role: str) -> None:
    """Turn {"layer": {"head_dim": .., "num_key_value_heads": ..}} into the global_* fields."""
    overrides = {}
    for key, fields in per_layer.items():
        try:
            index = int(key)
            out["layer_types"][index]
        except (ValueError, IndexError):
            raise MTPError(f"{role}: per_layer_config names no layer {key!r}") from None
        unknown = set(fields or {}) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise MTPError(f"{role}: per_layer_config[{key!r}] sets unsupported fields {sorted(unknown)}")
        overrides[index] = fields or {}
    full = {}
    for i, kind in enumerate(out["layer_types"]):
        o = overrides.get(i, {})
        head_dim = o.get("head_dim", out["head_dim"])
        kv_heads = o.get("num_key_value_heads", out["num_key_value_heads"])
        if kind == "sliding_attention":
            if (head_dim, kv_heads) != (out["head_dim"], out["num_key_value_heads"]):
                raise MTPError(f"{role}: per-layer overrides on sliding layer {i} are not supported")
        else:
            full[i] = (head_dim, kv_heads)
    shapes = set(full.values())
    if len(shapes) > 1:
        raise MTPError(f"{role}: full-attention layers with differing shapes are not supported")
    if shapes:
        (head_dim, kv_heads) = shapes.pop()
        out["global_head_dim"] = head_dim
        # without K=V the full layers' own KV head count only matters when it differs
        differs = kv_heads != out["num_key_value_heads"]
        out["num_global_key_value_heads"] = kv_heads if out["attention_k_eq_v"] or differs else None


def text_config_of(config: dict) -> dict:
    return config.get("text_config") or config


def normalize_target_config(config: dict) -> dict:
    """The target's config as mlx-lm must read it (also fixes the top-level vocab_size)."""
    model_type = config.get("model_type")
    if model_type not in TARGET_TYPES:
        raise MTPError(
            f"unsupported target model type '{model_type}': expected one of {', '.join(TARGET_TYPES)} (Gemma 4)"
        )
    out = copy.deepcopy(config)
    for key in ("vision_config", "audio_config", "auto_map"):
        out.pop(key, None)
    unified = model_type == "gemma4_unified"
    if model_type == "gemma4_text":
        return normalize_text_config(out, unified=False, role="target")
    text = normalize_text_config(out.get("text_config") or {}, unified, role="target")
    out["text_config"] = text
    # mlx-lm's wrapper overwrites the text vocab with the top-level one (default 262144).
    out["vocab_size"] = text["vocab_size"]
    return out


# transformers' Gemma4AssistantConfig defaults
DRAFT_DEFAULTS = {"use_ordered_embeddings": False, "num_centroids": 2048, "centroid_intermediate_top_k": 32}
# An assistant has no per-layer inputs; a writer that leaves these out still means 0.
DRAFT_TEXT_DEFAULTS = {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}
DRAFT_LAYER_TYPES = ("sliding_attention", "full_attention")


def normalize_draft_config(config: dict) -> dict:
    """The drafter's config with every field filled and checked: what DrafterArgs is built from."""
    model_type = config.get("model_type")
    if model_type not in DRAFT_TYPES:
        raise MTPError(
            f"unsupported drafter model type '{model_type}': expected one of {', '.join(DRAFT_TYPES)}"
        )
    if not isinstance(config.get("text_config"), dict) or not isinstance(config.get("backbone_hidden_size"), int):
        raise MTPError("drafter config needs a text_config and an integer backbone_hidden_size")
    out = copy.deepcopy(config)
    for key, value in DRAFT_DEFAULTS.items():
        if out.get(key) is None:
            out[key] = value
    text = out["text_config"]
    for key, value in DRAFT_TEXT_DEFAULTS.items():
        if text.get(key) is None:
            text[key] = value
    if text.get("vocab_size") is None and out.get("vocab_size") is not None:
        text["vocab_size"] = out["vocab_size"]
    text = normalize_text_config(text, model_type == "gemma4_unified_assistant", role="drafter")
    n = text["num_hidden_layers"]
    # transformers' Gemma4AssistantConfig: an unset or 0 count means every layer is shared
    text["num_kv_shared_layers"] = text["num_kv_shared_layers"] or n
    out["text_config"] = text
    check_draft_config(out)
    return out


def check_draft_config(config: dict) -> None:
    """What a drafter (normalized config) must be for us to run it."""
    text = config["text_config"]
    n = text["num_hidden_layers"]
    if any(t not in DRAFT_LAYER_TYPES for t in text["layer_types"]):
        raise MTPError(f"drafter config: bad layer_types {text['layer_types']}")
    if text["hidden_size_per_layer_input"]:
        raise MTPError("drafter config: per-layer inputs (hidden_size_per_layer_input) are not supported")
    if text["enable_moe_block"]:
        raise MTPError("drafter config: MoE blocks are not supported in a drafter")
    if text["num_kv_shared_layers"] != n:
        raise MTPError(f"drafter config: every layer must be KV-shared, got {text['num_kv_shared_layers']} of {n}")
    if text.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise MTPError(f"drafter config: unsupported activation {text['hidden_activation']!r}")
    if config["use_ordered_embeddings"]:
        vocab, c, k = text["vocab_size"], config["num_centroids"], config["centroid_intermediate_top_k"]
        if c <= 0 or vocab % c or not 0 < k <= c:
            raise MTPError(f"drafter config: vocab {vocab}, num_centroids {c}, top_k {k} do not fit together")


def attention_shapes(text: dict) -> dict:
    """(head_dim, kv_heads) per layer type, from a normalized text config."""
    # mlx-lm (like transformers) gives full layers their own KV head count only with K=V attention
    full_kv = (text["attention_k_eq_v"] and text["num_global_key_value_heads"]) or text["num_key_value_heads"]
    return {
        "sliding_attention": (text["head_dim"], text["num_key_value_heads"]),
        "full_attention": (text["global_head_dim"], full_kv),
    }


def validate_pair(target: dict, draft: dict) -> None:
    """Both configs normalized. Raises MTPError naming the first incompatibility."""
    t_text, d_text = text_config_of(target), draft["text_config"]
    unified_target = target["model_type"] == "gemma4_unified"
    unified_draft = draft["model_type"] == "gemma4_unified_assistant"
    if unified_target != unified_draft:
        raise MTPError(
            f"incompatible pair: a {draft['model_type']} drafter does not belong to a {target['model_type']} target"
        )
    backbone = draft.get("backbone_hidden_size")
    if backbone != t_text["hidden_size"]:
        raise MTPError(
            f"incompatible pair: the drafter reads hidden states of size {backbone}, "
            f"the target's are {t_text['hidden_size']}"
        )
    if d_text["vocab_size"] != t_text["vocab_size"]:
        raise MTPError(
            f"incompatible pair: drafter vocabulary {d_text['vocab_size']} != target vocabulary {t_text['vocab_size']}"
        )
    t_shapes, d_shapes = attention_shapes(t_text), attention_shapes(d_text)
    for kind in ("sliding_attention", "full_attention"):
        if t_shapes[kind] != d_shapes[kind]:
            raise MTPError(
                f"incompatible pair: the drafter's {kind} layers expect K/V of (head_dim, kv_heads) "
                f"{d_shapes[kind]}, the target produces {t_shapes[kind]}"
            )


# Gemma 4 targets by (hidden_size, num_hidden_layers): the name their MTP drafters are published under
KNOWN_TARGETS = {(1536, 35): "E2B", (2560, 42): "E4B", (3840, 48): "12B", (2816, 30): "26B-A4B", (5376, 60): "31B"}


def suggested_drafters(target: dict) -> list:
    """Hub ids of the drafter that fits a known Gemma 4 target (Google's, then mlx-community's
    conversion); [] for a target of another size."""
    text = text_config_of(target)
    name = KNOWN_TARGETS.get((text.get("hidden_size"), text.get("num_hidden_layers")))
    if name is None:
        return []
    return [f"google/gemma-4-{name}-it-assistant", f"mlx-community/gemma-4-{name}-it-assistant-bf16"]
