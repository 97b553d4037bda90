"""What we rely on inside mlx-lm's Gemma 4 (`mlx_lm.models.gemma4_text`), pinned in one place.

The target side (`model/target.py`) calls mlx-lm's text model and reads its caches; the drafter
(`model/drafter.py`) runs mlx-lm's decoder layers on K/V shared from the target. None of this is
mlx-lm's public API, so an mlx-lm upgrade that changes it must fail here, by name, rather than
as wrong drafts somewhere in the decode loop. Everything runs on a tiny model in a second or two.
"""

import inspect

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import gemma4, gemma4_text
from mlx_lm.models.cache import KVCache

from mlx_gemma_mtp.model.config import TEXT_DEFAULTS, UNIFIED_TEXT_DEFAULTS
from mlx_gemma_mtp.model.target import target_view

# 6 layers: 4 producers (sliding, full, sliding, full), then 2 KV-shared layers; with per-layer
# inputs (as E2B/E4B) and a sliding window shorter than the test prompts.
TINY = dict(
    model_type="gemma4_text",
    hidden_size=32,
    num_hidden_layers=6,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    num_kv_shared_layers=2,
    vocab_size=64,
    vocab_size_per_layer_input=64,
    hidden_size_per_layer_input=8,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"] * 3,
    final_logit_softcapping=30.0,
    use_double_wide_mlp=False,
    tie_word_embeddings=True,
)
SLIDING, FULL, SHARED = 0, 1, 4  # layer indices: a sliding producer, a full producer, a KV-shared layer


def tiny_args(**changes):
    return gemma4_text.ModelArgs.from_dict({**TINY, **changes})


def tiny_model(**changes):
    mx.random.seed(0)
    model = gemma4_text.Model(tiny_args(**changes))
    mx.eval(model.parameters())
    return model


def close(a, b):
    return mx.allclose(a, b, rtol=1e-4, atol=1e-5).item()


TOKENS = mx.array([[1, 5, 9, 2, 7, 3, 11, 4]])


# ---- ModelArgs --------------------------------------------------------------------------------


def test_model_args_read_every_field_the_converter_writes():
    # ModelArgs.from_dict silently drops keys it does not know: a renamed field would be ignored
    fields = set(inspect.signature(gemma4_text.ModelArgs).parameters)
    written = set(TEXT_DEFAULTS) | set(UNIFIED_TEXT_DEFAULTS) | {"model_type", "layer_types"}
    assert written <= fields, sorted(written - fields)


def test_model_args_attributes_we_read():
    args = tiny_args()
    assert args.layer_types == TINY["layer_types"]
    assert args.num_kv_shared_layers == 2
    assert args.num_hidden_layers == 6
    assert args.sliding_window == 4
    assert args.final_logit_softcapping == 30.0
    assert args.tie_word_embeddings is True
    assert args.max_position_embeddings == TEXT_DEFAULTS["max_position_embeddings"]
    # the RoPE of each layer type comes from rope_parameters keyed by layer type
    assert set(args.rope_parameters) == {"sliding_attention", "full_attention"}


# ---- the decoder layer (the drafter runs these on shared K/V) ---------------------------------


def test_decoder_layer_signatures():
    assert list(inspect.signature(gemma4_text.DecoderLayer.__init__).parameters) == ["self", "config", "layer_idx"]
    assert list(inspect.signature(gemma4_text.DecoderLayer.__call__).parameters) == [
        "self", "x", "mask", "cache", "per_layer_input", "shared_kv", "offset"]
    assert list(inspect.signature(gemma4_text.Attention.__call__).parameters) == [
        "self", "x", "mask", "cache", "shared_kv", "offset"]
    assert list(inspect.signature(gemma4_text.Gemma4TextModel.__call__).parameters)[:3] == ["self", "inputs", "cache"]
    assert list(inspect.signature(gemma4_text.logit_softcap).parameters) == ["softcap", "x"]


def test_decoder_layer_returns_hidden_shared_kv_and_offset():
    model = tiny_model()
    producer, shared = model.model.layers[SLIDING], model.model.layers[SHARED]
    assert producer.layer_type == "sliding_attention" and shared.layer_type == "sliding_attention"
    x = mx.random.normal((1, 3, TINY["hidden_size"]))

    cache = KVCache()
    h, kv, offset = producer(x, "causal", cache)
    keys, values = kv
    assert h.shape == x.shape
    assert keys.shape == values.shape == (1, TINY["num_key_value_heads"], 3, TINY["head_dim"])
    assert offset.item() == 0 and cache.offset == 3  # the offset the layer roped at, before the append

    # a KV-shared layer has no K/V projections of its own and passes the shared K/V and offset on
    assert not shared.self_attn.has_kv and not hasattr(shared.self_attn, "k_proj")
    position = mx.array(2, mx.int32)
    h2, kv2, offset2 = shared(x[:, -1:], None, None, shared_kv=kv, offset=position)
    assert h2.shape == (1, 1, TINY["hidden_size"])
    assert kv2[0] is keys and kv2[1] is values and offset2 is position
    with pytest.raises(ValueError):
        shared(x[:, -1:], None, None)  # no shared K/V: refused, not silently computed


# ---- the text model (the target) --------------------------------------------------------------


class Spy(nn.Module):
    """Records what goes into the wrapped module."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def __call__(self, x):
        self.seen.append(x)
        return self.inner(x)


def test_text_model_returns_final_norm_hidden_states():
    model = tiny_model()
    norm = model.model.norm
    assert isinstance(norm, nn.RMSNorm)
    spy = Spy(norm)
    model.model.norm = spy
    hidden = model.model(TOKENS)
    assert len(spy.seen) == 1 and close(hidden, norm(spy.seen[0]))  # the norm is the last thing applied
    model.model.norm = norm
    # ... and the logits are the tied head and softcap of exactly that
    expected = gemma4_text.logit_softcap(30.0, model.model.embed_tokens.as_linear(hidden))
    assert close(model(TOKENS), expected)
    assert close(target_view(model).logits(hidden), model(TOKENS))


def test_untied_head():
    model = tiny_model(tie_word_embeddings=False, final_logit_softcapping=None)
    assert model.tie_word_embeddings is False and model.final_logit_softcapping is None
    assert isinstance(model.lm_head, nn.Linear)
    assert close(target_view(model).logits(model.model(TOKENS)), model(TOKENS))


def test_model_attributes_we_read():
    model = tiny_model()
    assert model.args.layer_types == TINY["layer_types"]
    assert isinstance(model.model, gemma4_text.Gemma4TextModel)
    assert isinstance(model.model.embed_tokens, nn.Embedding) and hasattr(model.model.embed_tokens, "as_linear")
    assert model.model.embed_scale == pytest.approx(TINY["hidden_size"] ** 0.5)
    assert len(model.model.layers) == TINY["num_hidden_layers"]
    assert model.tie_word_embeddings is True and model.final_logit_softcapping == 30.0
    # the scaled embedding the drafter reads is the text model's own first hidden state
    view = target_view(model)
    assert close(view.embed(TOKENS), model.model.embed_tokens(TOKENS) * model.model.embed_scale)
    # the multimodal wrapper keeps the text model as `language_model`
    wrapped = gemma4.Model(gemma4.ModelArgs(text_config={k: v for k, v in TINY.items() if k != "vocab_size"},
                                            vocab_size=TINY["vocab_size"]))
    assert isinstance(wrapped.language_model, gemma4_text.Model)


class RowCache:
    """A cache in the shape of ours: one offset per row as an array [B], fixed buffers returned
    whole by update_and_fetch, and a boolean mask [B, 1, n, T] from make_mask that says what each
    query sees (window_size: the sliding window, passed by mlx-lm for sliding layers)."""

    def __init__(self, batch, capacity=16):
        self.capacity = capacity
        self.keys = self.values = None
        self.offset = mx.zeros((batch,), mx.int32)

    def update_and_fetch(self, keys, values):
        B, heads, n, dim = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, heads, self.capacity, dim), keys.dtype)
            self.values = mx.zeros((B, heads, self.capacity, values.shape[3]), values.dtype)
        at = (self.offset[:, None] + mx.arange(n))[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        self.offset = self.offset + n
        return self.keys, self.values

    def make_mask(self, n, window_size=None, return_array=False):
        q = (self.offset[:, None] + mx.arange(n))[:, :, None]  # [B, n, 1]
        k = mx.arange(self.capacity)[None, None]
        mask = k <= q
        if window_size is not None:
            mask = mask & (k > q - window_size)
        return mask[:, None]


def test_text_model_with_per_row_offsets():
    # What our caches rely on: the cache list holds the producer layers only (mlx-lm pads it with
    # None for the KV-shared layers, which reuse their producer's K/V and mask); each layer type's
    # mask comes from its first cache's make_mask (with the sliding window for sliding layers);
    # queries and keys are roped at each row's own offset (an array); a boolean [B, 1, n, T] mask
    # goes to attention as it is.
    model = tiny_model()
    rows = mx.array([[1, 5, 9, 2, 7, 3, 11, 4], [8, 6, 2, 12, 3, 9, 1, 5]])
    full = model.model(rows)  # no cache: the reference
    n_producers = TINY["num_hidden_layers"] - TINY["num_kv_shared_layers"]
    cache = [RowCache(2) for _ in range(n_producers)]
    prefill = model.model(rows[:, :6], cache=cache)
    assert close(prefill, full[:, :6])
    for c in cache:  # row 1 rolls back 3 tokens: the rows now stand at different positions
        c.offset = mx.array([6, 3], mx.int32)
    step = model.model(mx.stack([rows[0, 6:8], rows[1, 3:5]]), cache=cache)
    assert close(step[0], full[0, 6:8]) and close(step[1], full[1, 3:5])
    assert all(c.offset.tolist() == [8, 5] for c in cache)


# ---- RoPE offsets -----------------------------------------------------------------------------


class ArrayOffsetCache:
    """A cache whose offset is an array (one position per row) and which keeps nothing: the layer
    gets back the keys it has just roped."""

    def __init__(self, offset):
        self.offset = offset

    def update_and_fetch(self, keys, values):
        return keys, values


@pytest.mark.parametrize("index", [SLIDING, FULL], ids=["sliding", "full"])
def test_attention_ropes_at_the_cache_offset_per_row(index):
    model = tiny_model()
    layer = model.model.layers[index]
    x = mx.random.normal((2, 1, TINY["hidden_size"]))
    _, (keys, _), _ = layer(x, None, ArrayOffsetCache(mx.array([2, 5])))
    for row, position in enumerate([2, 5]):
        _, (row_keys, _), _ = layer(x[row : row + 1], None, ArrayOffsetCache(position))
        assert close(keys[row], row_keys[0])
    _, (other, _), _ = layer(x, None, ArrayOffsetCache(mx.array([3, 5])))
    assert not close(keys[0], other[0])  # the offset really moved the rotation


@pytest.mark.parametrize("index", [SLIDING, FULL], ids=["sliding", "full"])
def test_rope_accepts_array_offsets(index):
    rope = tiny_model().model.layers[index].self_attn.rope
    dims = TINY["head_dim"] if index == SLIDING else TINY["global_head_dim"]
    x = mx.random.normal((2, 1, 3, dims))
    assert close(rope(x, offset=mx.array(5, mx.int32)), rope(x, offset=5))  # the compiled draft step's scalar
    per_row = rope(x, offset=mx.array([2, 5]))
    assert close(per_row[0], rope(x[:1], offset=2)[0]) and close(per_row[1], rope(x[1:], offset=5)[0])


def test_shared_layer_ropes_queries_at_the_given_offset():
    # the drafter's queries sit at the last accepted position: an int, a scalar array (compiled
    # step) or one position per row
    model = tiny_model()
    shared = model.model.layers[SHARED]
    kv = (mx.random.normal((2, 1, 6, TINY["head_dim"])), mx.random.normal((2, 1, 6, TINY["head_dim"])))
    x = mx.random.normal((2, 1, TINY["hidden_size"]))
    at_int, _, _ = shared(x, None, None, shared_kv=kv, offset=5)
    at_scalar, _, _ = shared(x, None, None, shared_kv=kv, offset=mx.array(5, mx.int32))
    assert close(at_int, at_scalar)
    per_row, _, _ = shared(x, None, None, shared_kv=kv, offset=mx.array([2, 5]))
    row0, _, _ = shared(x[:1], None, None, shared_kv=(kv[0][:1], kv[1][:1]), offset=2)
    assert close(per_row[0], row0[0]) and close(per_row[1], at_int[1])
    assert not close(per_row[0], at_int[0])
