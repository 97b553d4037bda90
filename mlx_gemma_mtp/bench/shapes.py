"""Random Gemma 4 pairs with a real variant's per-layer shapes (`gemma-mtp bench --shape`).

A random target built with mlx-lm's gemma4_text and the variant's real per-layer shapes (fewer
layers and a smaller vocabulary, chosen per run), a random drafter with the real drafter's shapes,
and a word tokenizer for their vocabulary: what the bench and the scripts in benchmarks/ measure
when no converted checkpoint is at hand.

MLX and mlx-lm are imported on use: the command line reads SHAPES for `--shape`'s choices.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Shape:
    """Per-layer shapes of one Gemma 4 variant and of its drafter. Layer count and vocabulary
    are chosen per run; the rest are the real values (where gemma4-formats.md does not state a
    figure, the public configs' values as we know them)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    sliding_per_full: int
    window: int
    real_layers: int
    kv_shared: int = 0  # of real_layers
    per_layer_input: int = 0  # PLE width
    k_eq_v: bool = False
    global_kv_heads: Optional[int] = None
    double_wide_mlp: bool = False
    experts: int = 0
    top_k_experts: int = 0
    moe_intermediate: int = 0
    draft_hidden: int = 1024
    draft_intermediate: int = 4096
    centroid_head: bool = False


SHAPES = {
    "e2b": Shape(1536, 8, 1, 6144, 4, 512, 35, kv_shared=20, per_layer_input=256, double_wide_mlp=True,
                 draft_hidden=256, draft_intermediate=2048, centroid_head=True),
    "e4b": Shape(2560, 8, 2, 10240, 5, 512, 42, kv_shared=18, per_layer_input=256, double_wide_mlp=True,
                 draft_hidden=256, draft_intermediate=2048, centroid_head=True),
    "12b": Shape(3840, 16, 8, 15360, 5, 1024, 48, k_eq_v=True, global_kv_heads=4),
    "26b": Shape(2816, 16, 8, 2112, 5, 1024, 30, k_eq_v=True, global_kv_heads=2,
                 experts=128, top_k_experts=8, moe_intermediate=704),
    "31b": Shape(5376, 32, 16, 21504, 5, 1024, 60, k_eq_v=True, global_kv_heads=4),
}
TOKENS_PER_CENTROID = 128  # 262144 / 2048 in the real E2B/E4B drafters
CENTROID_TOP_K = 32


def layer_types(shape: Shape, layers: int) -> list:
    period = ["sliding_attention"] * shape.sliding_per_full + ["full_attention"]
    types = (period * (layers // len(period) + 1))[:layers]
    types[-1] = "full_attention"
    return types


def kv_shared_layers(shape: Shape, layers: int) -> int:
    """The real share of KV-shared layers, keeping at least one whole period of producers."""
    shared = round(layers * shape.kv_shared / shape.real_layers)
    return max(0, min(shared, layers - shape.sliding_per_full - 1))


def target_args(shape: Shape, layers: int, vocab: int, experts: Optional[int] = None):
    from mlx_lm.models import gemma4_text

    moe = {}
    if shape.experts:
        n = experts or shape.experts
        moe = dict(enable_moe_block=True, num_experts=n, top_k_experts=min(shape.top_k_experts, n),
                   moe_intermediate_size=shape.moe_intermediate)
    return gemma4_text.ModelArgs(
        hidden_size=shape.hidden,
        num_hidden_layers=layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        head_dim=256,
        global_head_dim=512,
        num_key_value_heads=shape.kv_heads,
        num_global_key_value_heads=shape.global_kv_heads,
        num_kv_shared_layers=kv_shared_layers(shape, layers),
        hidden_size_per_layer_input=shape.per_layer_input,
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab if shape.per_layer_input else 0,
        sliding_window=shape.window,
        layer_types=layer_types(shape, layers),
        attention_k_eq_v=shape.k_eq_v,
        use_double_wide_mlp=shape.double_wide_mlp,
        final_logit_softcapping=30.0,
        **moe,
    )


def drafter_config(shape: Shape, vocab: int) -> dict:
    """A drafter config.json as the real assistants write it (4 layers, all KV-shared)."""
    text = dict(
        model_type="gemma4_text",
        vocab_size=vocab,
        hidden_size=shape.draft_hidden,
        intermediate_size=shape.draft_intermediate,
        num_hidden_layers=4,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=256,
        global_head_dim=512,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        sliding_window=shape.window,
        attention_k_eq_v=shape.k_eq_v,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=4,
    )
    if shape.global_kv_heads:
        text["num_global_key_value_heads"] = shape.global_kv_heads
    config = dict(model_type="gemma4_assistant", backbone_hidden_size=shape.hidden, text_config=text)
    if shape.centroid_head:
        centroids = max(1, vocab // TOKENS_PER_CENTROID)
        config.update(use_ordered_embeddings=True, num_centroids=centroids,
                      centroid_intermediate_top_k=min(CENTROID_TOP_K, centroids))
    return config


def random_pair(name: str, layers: int, vocab: int, experts: Optional[int] = None, seed: int = 0,
                dtype=None):
    """A random target with `name`'s per-layer shapes and its real-shaped random drafter, as a
    Pair, in `dtype` (default float32, for CPUs, see measuring.md; bfloat16 is what GPUs and Macs
    run)."""
    import mlx.core as mx
    from mlx_lm.models import gemma4_text

    from mlx_gemma_mtp.runtime.pair import Pair
    from mlx_gemma_mtp.model.drafter import Drafter, DrafterArgs

    dtype = mx.float32 if dtype is None else dtype
    shape = SHAPES[name]
    if shape.centroid_head and vocab % TOKENS_PER_CENTROID:
        raise ValueError(f"--vocab must be a multiple of {TOKENS_PER_CENTROID} for {name}'s centroid head")
    mx.random.seed(seed)
    target = gemma4_text.Model(target_args(shape, layers, vocab, experts))
    target.set_dtype(dtype)
    mx.eval(target.parameters())
    drafter = Drafter(DrafterArgs.from_dict(drafter_config(shape, vocab)))
    if shape.centroid_head:
        drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    drafter.set_dtype(dtype)
    mx.eval(drafter.parameters())
    drafter.eval()
    return Pair(target, drafter)


def word_tokenizer(vocab: int):
    """A tokenizer whose ids are the words w0..w{vocab-1}: mlx-lm needs one to stream."""
    import json
    import tempfile
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(tempfile.mkdtemp(prefix="gemma-mtp-bench-"))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    special = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "w0", "eos_token": "w1", "bos_token": "w2"}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))
    return load_tokenizer(folder)
