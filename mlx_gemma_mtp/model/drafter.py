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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4_text

from mlx_gemma_mtp.model.checkpoint import load_tensors, read_config, weight_files
from mlx_gemma_mtp.model.config import normalize_draft_config
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.quantized_cache import reader_for

SharedKV = Dict[str, Tuple[mx.array, mx.array]]


def text_model_args(text_config: dict) -> gemma4_text.ModelArgs:
    """mlx-lm Gemma 4 text args for the drafter's decoder stack, from its normalized text config."""
    # double-wide MLPs only apply after a non-shared prefix, which a drafter has not;
    # the drafter's head has no softcap
    return gemma4_text.ModelArgs.from_dict(
        {**text_config, "use_double_wide_mlp": False, "final_logit_softcapping": None}
    )


@dataclass
class DrafterArgs:
    """Built from a normalized config (`config.normalize_draft_config`): use `from_dict`."""

    model_type: str
    text_config: Dict[str, Any]
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    text: gemma4_text.ModelArgs = field(init=False, repr=False)
    vocab_size: int = field(init=False)
    sliding_window: int = field(init=False)

    @classmethod
    def from_dict(cls, config: dict) -> "DrafterArgs":
        config = normalize_draft_config(config)
        return cls(
            model_type=config["model_type"],
            text_config=config["text_config"],
            backbone_hidden_size=config["backbone_hidden_size"],
            use_ordered_embeddings=bool(config["use_ordered_embeddings"]),
            num_centroids=config["num_centroids"],
            centroid_intermediate_top_k=config["centroid_intermediate_top_k"],
        )

    def __post_init__(self):
        self.text = text_model_args(self.text_config)
        self.vocab_size = self.text.vocab_size
        self.sliding_window = self.text.sliding_window


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
            # quantized producer K/V (quantized_cache.py): a reader gives mlx-lm's attention their settings
            reader = reader_for(kv[kind], layer.self_attn.head_dim)
            x, _, _ = layer(x, masks[kind], reader, shared_kv=kv[kind], offset=position)
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

    def logits(self, h: mx.array, per_row: bool = False) -> mx.array:
        """Full-vocabulary logits [B, L, V] for sampling; h is the normed hidden state."""
        if not self.args.use_ordered_embeddings:
            return self.model.embed_tokens.as_linear(h)
        ids, sel = self._selected(h)
        # reference: unselected tokens get (min over all selected logits of the batch) - 1;
        # `per_row`: over each row's own, so that a row's q does not depend on its batch
        fill = (sel.min(axis=(-2, -1), keepdims=True) if per_row else sel.min()) - 1
        fill = fill.astype(sel.dtype)
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
    config = read_config(path, "drafter")
    model = Drafter(DrafterArgs.from_dict(config))
    weights = model.sanitize(load_tensors(weight_files(path, "drafter"), "drafter"))
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
