"""The target side: mlx-lm's Gemma 4 model, read the way the drafter needs it.

mlx-lm's text model returns the final-norm hidden states (what the drafter reads) and its caches
hold the producer layers' K/V (what the drafter attends to); only the LM head is applied here,
so that verification can take logits at every drafted position and prefill only at the last.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import logit_softcap

from mlx_gemma_mtp.runtime.cache import make_target_cache
from mlx_gemma_mtp.runtime.quantized_cache import QuantizedRead, dequantize, is_quantized, make_quantized_cache


@dataclass
class TargetView:
    text: nn.Module  # mlx_lm gemma4_text.Model
    producers: dict  # layer type -> index of the cache holding the K/V the drafter reads
    # with a quantized cache: the drafter reads dequantized producer K/V (True) or attends to the
    # triples with quantized attention (False); `benchmarks/quantized_kv.py speed` measures both
    drafter_dequantizes: bool = False
    # on a rank of a group (sharding.py): the cache list as the sharded layers see it (producer
    # caches hold every KV head for the drafter; their attention reads this rank's heads)
    forward_cache: Optional[Callable] = None

    @property
    def args(self):
        return self.text.args

    def make_cache(self, batch: int = 1, kv_quant=None) -> list:
        """Float caches, or quantized ones (quantized_cache.KVQuant) from the first token."""
        if kv_quant is not None:
            return make_quantized_cache(self.args, kv_quant, batch)
        return make_target_cache(self.args, batch)

    def whole_cache(self) -> list:
        """mlx-lm's plain caches, one per non-KV-shared layer: every position's K/V in order (one
        forward over a training batch reads them all)."""
        return [KVCache() for _ in range(self.args.num_hidden_layers - self.args.num_kv_shared_layers)]

    def hidden(self, tokens: mx.array, cache: list, embeddings: Optional[mx.array] = None) -> mx.array:
        """Final-norm hidden states [B, L, H] for `tokens` [B, L], appending to `cache`; with
        `embeddings` (`image_embeddings`) the tokens only give the per-layer inputs."""
        if is_quantized(cache):  # the KV-shared layers read the producers' triples
            cache = cache + [QuantizedRead(cache[0].bits, cache[0].group_size)] * self.args.num_kv_shared_layers
        if self.forward_cache is not None:
            cache = self.forward_cache(cache)
        if embeddings is not None:
            return self.text.model(tokens, cache=cache, input_embeddings=embeddings)
        return self.text.model(tokens, cache=cache)

    def image_embeddings(self, tokens: mx.array, images: list) -> mx.array:
        """Input embeddings [1, L, H] for `tokens` [1, L] (the pad id at image positions) with
        each (start, soft tokens [N, H]) of `images` at positions start .. start + N. mlx-lm scales
        input embeddings by sqrt(hidden) (a Python float): text rows go in unscaled, and soft
        tokens, which the reference scatters in unscaled, divided by that scale."""
        model = self.text.model
        embedded = model.embed_tokens(tokens)
        scale = mx.array(model.embed_scale, embedded.dtype)
        pieces, at = [], 0
        for start, soft in images:
            pieces += [embedded[:, at:start], (soft.astype(embedded.dtype) / scale)[None]]
            at = start + soft.shape[0]
        pieces.append(embedded[:, at:])
        return mx.concatenate(pieces, axis=1)

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
        if self.drafter_dequantizes and is_quantized(cache):
            kv = {kind: (dequantize(k, full.q), dequantize(v, full.q)) for kind, (k, v) in kv.items()}
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
