"""The target side: mlx-lm's Gemma 4 model, read the way the drafter needs it.

mlx-lm's text model returns the final-norm hidden states (what the drafter reads) and its caches
hold the producer layers' K/V (what the drafter attends to); only the LM head is applied here,
so that verification can take logits at every drafted position and prefill only at the last.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import logit_softcap

from .cache import make_target_cache


@dataclass
class TargetView:
    text: nn.Module  # mlx_lm gemma4_text.Model
    producers: dict  # layer type -> index of the cache holding the K/V the drafter reads

    @property
    def args(self):
        return self.text.args

    def make_cache(self, batch: int = 1) -> list:
        return make_target_cache(self.args, batch)

    def whole_cache(self) -> list:
        """mlx-lm's plain caches, one per non-KV-shared layer: every position's K/V in order (one
        forward over a training batch reads them all)."""
        return [KVCache() for _ in range(self.args.num_hidden_layers - self.args.num_kv_shared_layers)]

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

    def shared_kv(self, cache: list, window: int) -> tuple:
        """The K/V the drafter attends to and their masks [B, 1, 1, T] (True = read): every
        accepted token of the last full producer, the last `window` accepted tokens of the last
        sliding producer. Whole buffers with masks, so the shapes change only when a full buffer
        grows and the compiled draft step is rarely traced again."""
        full = cache[self.producers["full_attention"]]
        sliding = cache[self.producers["sliding_attention"]]
        kv = {"full_attention": (full.keys, full.values), "sliding_attention": (sliding.keys, sliding.values)}
        masks = {"full_attention": full.visible(), "sliding_attention": sliding.visible(window)}
        return kv, masks


def target_view(model: nn.Module) -> TargetView:
    text = getattr(model, "language_model", model)
    args = text.args
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    producers = {kind: i for i, kind in enumerate(args.layer_types[:first_shared])}
    if set(producers) != {"full_attention", "sliding_attention"}:
        raise ValueError("the target has no producer layer of each attention type for the drafter")
    return TargetView(text, producers)
