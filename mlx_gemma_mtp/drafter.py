"""The Gemma 4 multi-token-prediction drafter ("assistant") on MLX.

Model types `gemma4_assistant` and `gemma4_unified_assistant`. The parameter tree keeps the
Hugging Face names so the published safetensors load as they are. The decoder layers are
mlx-lm's Gemma 4 layers; every one of them is KV-shared: it reads the K/V of the target's last
layer of the same type and never writes K/V of its own.

One draft step (reference: transformers' `Gemma4AssistantForCausalLM.forward`):

    x = pre_projection(concat([target_embed(token) * sqrt(backbone), hidden]))
    x = layers(x)       # queries at the fixed block position, K/V shared from the target
    h = norm(x)         # -> the LM head (`logits` / `greedy_token`)
    hidden = post_projection(h)   # -> the next step's `hidden`
"""

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import gemma4_text

from .config import normalize_text_config
from .errors import MTPError

MODEL_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
LAYER_TYPES = ("sliding_attention", "full_attention")

SharedKV = Dict[str, Tuple[mx.array, mx.array]]


def text_model_args(text_config: dict, unified: bool = False) -> gemma4_text.ModelArgs:
    """mlx-lm Gemma 4 text args for the drafter's decoder stack (every layer KV-shared)."""
    n = text_config.get("num_hidden_layers", 4)
    # An assistant's config states these as 0/False; when a writer leaves them out they still are.
    tc = {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "num_hidden_layers": n}
    tc.update(text_config)
    tc["num_kv_shared_layers"] = tc.get("num_kv_shared_layers") or n  # transformers turns 0 into "all"
    tc = normalize_text_config(tc, unified, role="drafter config")
    if any(t not in LAYER_TYPES for t in tc["layer_types"]):
        raise MTPError(f"drafter config: bad layer_types {tc['layer_types']}")
    if tc["hidden_size_per_layer_input"]:
        raise MTPError("drafter config: per-layer inputs (hidden_size_per_layer_input) are not supported")
    if tc["enable_moe_block"]:
        raise MTPError("drafter config: MoE blocks are not supported in a drafter")
    if tc["num_kv_shared_layers"] != n:
        raise MTPError(f"drafter config: every layer must be KV-shared, got {tc['num_kv_shared_layers']} of {n}")
    if tc.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise MTPError(f"drafter config: unsupported activation {tc['hidden_activation']!r}")
    # double-wide MLPs only apply after a non-shared prefix, which a drafter has not;
    # the drafter's head has no softcap
    tc.update(use_double_wide_mlp=False, final_logit_softcapping=None)
    return gemma4_text.ModelArgs.from_dict(tc)


@dataclass
class DrafterArgs:
    model_type: str
    text_config: Dict[str, Any]
    backbone_hidden_size: int
    vocab_size: int = 262144
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    text: gemma4_text.ModelArgs = field(init=False, repr=False)
    sliding_window: int = field(init=False)

    @classmethod
    def from_dict(cls, config: dict) -> "DrafterArgs":
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise MTPError(f"not a Gemma 4 drafter: model_type {model_type!r}, expected one of {MODEL_TYPES}")
        text_config = config.get("text_config")
        if not isinstance(text_config, dict) or "backbone_hidden_size" not in config:
            raise MTPError("drafter config needs a text_config and backbone_hidden_size")
        return cls(
            model_type=model_type,
            text_config=text_config,
            backbone_hidden_size=config["backbone_hidden_size"],
            vocab_size=text_config.get("vocab_size", config.get("vocab_size", 262144)),
            use_ordered_embeddings=bool(config.get("use_ordered_embeddings", False)),
            num_centroids=config.get("num_centroids", 2048),
            centroid_intermediate_top_k=config.get("centroid_intermediate_top_k", 32),
        )

    def __post_init__(self):
        self.text = text_model_args(
            {**self.text_config, "vocab_size": self.vocab_size}, self.model_type == "gemma4_unified_assistant"
        )
        window = self.text_config.get("sliding_window", 512)
        # transformers' config halves the window when everything is bidirectional
        if self.text_config.get("use_bidirectional_attention") == "all":
            window = window // 2 + 1
        self.sliding_window = window
        if self.use_ordered_embeddings:
            c, k = self.num_centroids, self.centroid_intermediate_top_k
            if c <= 0 or self.vocab_size % c or not 0 < k <= c:
                raise MTPError(
                    f"drafter config: vocab {self.vocab_size}, num_centroids {c}, top_k {k} do not fit together"
                )


class TextModel(nn.Module):
    def __init__(self, args: gemma4_text.ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)  # tied LM head only
        self.layers = [gemma4_text.DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MaskedEmbedding(nn.Module):
    """The centroid router of the sparse LM head; the token rows come from `embed_tokens`."""

    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.centroids = nn.Linear(args.text.hidden_size, args.num_centroids, bias=False)
        # token_ordering.reshape(num_centroids, -1)[c] are the canonical ids of cluster c
        self.token_ordering = mx.arange(args.vocab_size, dtype=mx.int32)


def sliding_mask(q_len: int, kv_len: int, window: int) -> mx.array:
    """Which shared sliding K/V entries each drafter query sees ([q_len, kv_len], True = attend).

    The reference builds a bidirectional window |q - kv| <= window over the shared K/V and flips
    it on the kv axis, so query i sees entry j iff |i - (kv_len - 1 - j)| <= window. For a single
    query that is the last window + 1 entries (one more than the target's own sliding layer sees).
    """
    back = (kv_len - 1 - mx.arange(kv_len))[None, :] - mx.arange(q_len)[:, None]
    return mx.abs(back) <= window


class Drafter(nn.Module):
    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.args = args
        self.model = TextModel(args.text)
        hidden, backbone = args.text.hidden_size, args.backbone_hidden_size
        self.pre_projection = nn.Linear(2 * backbone, hidden, bias=False)
        self.post_projection = nn.Linear(hidden, backbone, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(args)

    @property
    def layer_types(self):
        return self.args.text.layer_types

    def _visible(self, shared_kv: SharedKV, q_len: int, attention_mask: Optional[mx.array]):
        """Per layer type: the K/V the drafter reads and its boolean mask (None = all)."""
        kv, masks = {}, {}
        pad = None if attention_mask is None else attention_mask.astype(mx.bool_)
        for kind in set(self.layer_types):
            if kind not in shared_kv:
                raise MTPError(f"the drafter needs shared K/V for {kind!r}")
            keys, values = shared_kv[kind]
            t_full = shared_kv["full_attention"][0].shape[2] if "full_attention" in shared_kv else keys.shape[2]
            # like the reference: the padding mask is cut to the full K/V, the sliding one is its tail
            p = None if pad is None else pad[:, :t_full][:, -keys.shape[2]:]
            mask = None
            if kind == "sliding_attention":
                window = self.args.sliding_window
                if q_len == 1 and keys.shape[2] > window + 1:
                    # one query sees exactly the last window + 1 entries: slice instead of masking
                    keys, values = keys[:, :, -(window + 1):], values[:, :, -(window + 1):]
                    p = None if p is None else p[:, -(window + 1):]
                elif max(keys.shape[2], q_len) > window + 1:
                    mask = sliding_mask(q_len, keys.shape[2], window)[None, None]
            if p is not None:
                p = p[:, None, None, :]
                mask = p if mask is None else mask & p
            kv[kind], masks[kind] = (keys, values), mask
        return kv, masks

    def __call__(
        self,
        token_embedding: mx.array,
        hidden: mx.array,
        shared_kv: SharedKV,
        position: Union[int, mx.array],
        attention_mask: Optional[mx.array] = None,
    ) -> Tuple[mx.array, mx.array]:
        """One draft step.

        token_embedding: [B, L, backbone], the target's scaled embedding of the last token.
        hidden: [B, L, backbone], the target's final-norm hidden state (first step) or the
            drafter's previous projected output.
        shared_kv: {"full_attention": (k, v), "sliding_attention": (k, v)}, each [B, kv_heads, T, D],
            normed and RoPE'd by the target, oldest entry first, ending at the last accepted token.
        position: query RoPE offset (int, or [B] per row): the last accepted token's position.
        attention_mask: optional [B, T_full] padding mask (nonzero = attend), as in the reference.
        Returns (h, projected): h = norm(x) for the LM head, projected = post_projection(h).
        """
        kv, masks = self._visible(shared_kv, token_embedding.shape[1], attention_mask)
        return self.step(token_embedding, hidden, kv, masks, position)

    def step(self, token_embedding, hidden, kv: SharedKV, masks: dict, position) -> Tuple[mx.array, mx.array]:
        """The draft step on K/V already cut to what the queries see (`masks` per layer type,
        None or boolean). Inference and training (`train.py`) both run through here."""
        x = self.pre_projection(mx.concatenate([token_embedding, hidden], axis=-1))
        for layer in self.model.layers:
            kind = layer.layer_type
            x, _, _ = layer(x, masks[kind], None, shared_kv=kv[kind], offset=position)
        h = self.model.norm(x)
        return h, self.post_projection(h)

    # --- LM heads -------------------------------------------------------------------------

    def _selected(self, h: mx.array) -> Tuple[mx.array, mx.array]:
        """Centroid head: canonical ids [B, L, S] of the top-k clusters' tokens and their logits."""
        me, a = self.masked_embedding, self.args
        k = a.centroid_intermediate_top_k
        scores = me.centroids(h)
        top = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]  # the set is what matters
        ids = me.token_ordering.reshape(a.num_centroids, -1)[top].flatten(-2)
        rows = self.model.embed_tokens(ids)  # gathers (and dequantizes) only the selected rows
        logits = (h[..., None, :] @ rows.swapaxes(-1, -2)).squeeze(-2)
        return ids, logits

    def logits(self, h: mx.array) -> mx.array:
        """Full-vocabulary logits [B, L, V] for sampling; h is the normed hidden state."""
        if not self.args.use_ordered_embeddings:
            return self.model.embed_tokens.as_linear(h)
        ids, sel = self._selected(h)
        # reference: unselected tokens get (min over all selected logits of the batch) - 1
        fill = (sel.min() - 1).astype(sel.dtype)
        out = mx.broadcast_to(fill, (*sel.shape[:-1], self.args.vocab_size))
        return mx.put_along_axis(out, ids, sel, axis=-1)

    def greedy_token(self, h: mx.array) -> mx.array:
        """argmax of `logits(h)` as int32 [B, L], on device and without full-vocabulary logits
        for the centroid head. Ties go to the lowest canonical id, like torch's argmax."""
        if not self.args.use_ordered_embeddings:
            return mx.argmax(self.model.embed_tokens.as_linear(h), axis=-1).astype(mx.int32)
        ids, sel = self._selected(h)
        best = sel.max(axis=-1, keepdims=True)
        return mx.where(sel == best, ids, self.args.vocab_size).min(axis=-1).astype(mx.int32)

    # --- weights --------------------------------------------------------------------------

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        out = {}
        for k, v in weights.items():
            if k.startswith("lm_head."):
                continue  # tied to model.embed_tokens
            if "rotary_emb." in k:
                continue  # RoPE tables are recomputed
            parts = k.split(".")
            if (
                len(parts) > 4
                and parts[:2] == ["model", "layers"]
                and parts[3] == "self_attn"
                and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm")
            ):
                continue  # KV-shared layers never use their own K/V (the reference ignores these too)
            if k == "masked_embedding.token_ordering":
                if v.dtype not in (mx.int32, mx.int64, mx.uint32, mx.uint64):
                    raise MTPError(f"masked_embedding.token_ordering must be integer, got {v.dtype}")
                v = v.astype(mx.int32)
            out[k] = v
        return out


def _quant_params(config: dict) -> Optional[dict]:
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        return q
    return None


def quantize_like(model: Drafter, config: dict, weights: Dict[str, mx.array]) -> None:
    """Quantize exactly the modules whose checkpoint tensors carry `.scales` (mlx-community style)."""
    q = _quant_params(config)
    if not any(k.endswith(".scales") for k in weights):
        return
    if q is None:
        raise MTPError("drafter weights are quantized (.scales) but config.json has no 'quantization'")

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        override = q.get(path)
        params = override if isinstance(override, dict) else q
        return {
            "group_size": params.get("group_size", q.get("group_size", 64)),
            "bits": params.get("bits", q["bits"]),
            "mode": params.get("mode", q.get("mode", "affine")),
        }

    nn.quantize(model, class_predicate=predicate)


def _read_weights(path: Path) -> Dict[str, mx.array]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({str(path / f) for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise MTPError(f"no *.safetensors files in {path}")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def _check_keys(model: Drafter, weights: Dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise MTPError(f"drafter weights in {where} do not fit the config: " + "; ".join(problems))


def load_drafter(path: Union[str, Path]) -> Tuple[Drafter, dict]:
    """Load a drafter folder (config.json + safetensors, HF names, optionally quantized)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise MTPError(f"no config.json in {path}")
    config = json.loads(config_file.read_text())
    model = Drafter(DrafterArgs.from_dict(config))
    weights = model.sanitize(_read_weights(path))
    quantize_like(model, config, weights)
    _check_keys(model, weights, path)
    if "masked_embedding.token_ordering" in weights:
        order = weights["masked_embedding.token_ordering"]
        if not mx.array_equal(mx.sort(order), mx.arange(order.size, dtype=order.dtype)).item():
            raise MTPError(f"masked_embedding.token_ordering in {path} is not a permutation of the vocabulary")
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    model.eval()
    return model, config


def _quantization_of(model: Drafter) -> Optional[dict]:
    """The config's 'quantization' entry that reproduces the model's quantized modules."""
    found = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not found:
        return None
    values = list(found.values())
    base = max(values, key=values.count)
    q = dict(base)
    q.update({path: p for path, p in found.items() if p != base})
    return q


def save_drafter(model: Drafter, config: dict, path: Union[str, Path]) -> None:
    """Write model.safetensors + config.json with the HF names (what load_drafter reads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the model itself says what is quantized; a stale entry in `config` must not win.
    # Both keys, as mlx-lm writes them.
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    q = _quantization_of(model)
    if q is not None:
        config["quantization"], config["quantization_config"] = q, dict(q)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
