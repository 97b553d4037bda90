"""The target side: mlx-lm's Gemma 4 model, read the way the drafter needs it.

mlx-lm's text model returns the final-norm hidden states (what the drafter reads) and its caches
hold the producer layers' K/V (what the drafter attends to); only the LM head is applied here,
so that verification can take logits at every drafted position and prefill only at the last.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import logit_softcap

from .cache import make_target_cache


@dataclass
class TargetView:
    text: nn.Module  # mlx_lm gemma4_text.Model
    producers: dict  # layer type -> index of the cache holding the K/V the drafter reads

    @property
    def args(self):
        return self.text.args

    def make_cache(self, slack: int) -> list:
        return make_target_cache(self.args, slack)

    def hidden(self, tokens: mx.array, cache: list) -> mx.array:
        """Final-norm hidden states [B, L, H] for `tokens` [B, L], appending to `cache`."""
        return self.text.model(tokens, cache=cache)

    def logits(self, hidden: mx.array) -> mx.array:
        text = self.text
        out = text.model.embed_tokens.as_linear(hidden) if text.tie_word_embeddings else text.lm_head(hidden)
        if text.final_logit_softcapping is not None:
            out = logit_softcap(text.final_logit_softcapping, out)
        return out

    def embed(self, tokens: mx.array) -> mx.array:
        """The scaled token embedding the drafter concatenates with the hidden state."""
        return self.text.model.embed_tokens(tokens) * self.text.model.embed_scale

    def shared_kv(self, cache: list, window: int) -> dict:
        """The K/V the drafter attends to: every cached token of the last full and sliding producers."""
        full = cache[self.producers["full_attention"]]
        keys, values = full.keys[..., : full.offset, :], full.values[..., : full.offset, :]
        return {
            "full_attention": (keys, values),
            "sliding_attention": cache[self.producers["sliding_attention"]].last(window),
        }

    def shared_kv_bucketed(self, cache: list, window: int, bucket: int = 64) -> tuple:
        """`shared_kv` with shapes that change every `bucket` tokens instead of every round, for the
        compiled draft step: the full layer's K/V up to the next multiple of `bucket` with a mask
        [1, 1, 1, T] of the cached entries; the sliding layer's last `window` entries (or, while
        fewer are cached, a bucketed prefix and its mask). Masks are None where all are visible."""

        def prefix(c, n):
            size = min(-(-n // bucket) * bucket, c.keys.shape[2])
            mask = None if size == n else (mx.arange(size) < n)[None, None, None]
            return (c.keys[..., :size, :], c.values[..., :size, :]), mask

        full = cache[self.producers["full_attention"]]
        sliding = cache[self.producers["sliding_attention"]]
        kv, masks = {}, {}
        kv["full_attention"], masks["full_attention"] = prefix(full, full.offset)
        if sliding.end >= window:
            kv["sliding_attention"], masks["sliding_attention"] = sliding.last(window), None
        else:  # nothing dropped yet: the buffer starts at the first token
            kv["sliding_attention"], masks["sliding_attention"] = prefix(sliding, sliding.end)
        return kv, masks


def target_view(model: nn.Module) -> TargetView:
    text = getattr(model, "language_model", model)
    args = text.args
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    producers = {kind: i for i, kind in enumerate(args.layer_types[:first_shared])}
    if set(producers) != {"full_attention", "sliding_attention"}:
        raise ValueError("the target has no producer layer of each attention type for the drafter")
    return TargetView(text, producers)
