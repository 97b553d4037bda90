"""Miniature Gemma 4 checkpoints fabricated with the transformers reference.

Each variant keeps the structural features of its real counterpart (PLE, KV sharing, K=V global
layers, MoE, centroid drafter head, multimodal wrapper keys) at toy sizes, and is written in the
on-disk layout of Google's uploads: sharded safetensors + index, float32, generation_config.json,
a small byte-level BPE tokenizer with Gemma's special ids and a chat template.

Every tensor is randomized from a seed so a loader that drops or misroutes one gets wrong logits.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

VARIANTS = ("e2b", "e4b", "12b", "26b", "31b")
CONFIG_STYLES = ("google", "per_layer")

VOCAB = 512
HIDDEN = 64
HEAD_DIM = 32
GLOBAL_HEAD_DIM = 64  # differs from HEAD_DIM on purpose, as in the real models (256 vs 512)
SOFTCAP = 30.0
EOS_IDS = [1, 106]
BOS_ID = 2
PAD_ID = 0

# Drafter shape shared by every variant (hidden 64 so group-64 quantization applies).
DRAFT_LAYERS = ["sliding_attention"] * 3 + ["full_attention"]
DRAFT_HIDDEN = 64
DRAFT_HEADS = 4
DRAFT_INTERMEDIATE = 128

EMBED_ROW_NORM = 3.0  # logits = h . e with |h| ~ sqrt(hidden): std ~3, median top-2 margin ~0.7
LAYER_SCALAR_LOW = 0.3
MINI_PATCH = {False: 4, True: 2}  # the miniatures' vision patch side: towers, the 12B (unified)
TARGET_SHARDS = 3  # aim for about this many shards per target, like the multi-file uploads
VISION_POSITIONS = 512  # vision position table length (real: 10240 for the towers, 1120 for the 12B)


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate: int


@dataclass(frozen=True)
class VariantSpec:
    name: str
    num_layers: int
    sliding_per_full: int  # pattern: this many sliding layers, then one full layer
    num_heads: int
    num_kv_heads: int
    intermediate: int
    sliding_window: int
    num_global_kv_heads: int | None = None  # set => attention_k_eq_v on full layers
    ple_dim: int = 0  # hidden_size_per_layer_input
    kv_shared: int = 0  # num_kv_shared_layers
    double_wide_mlp: bool = False
    moe: MoESpec | None = None
    unified: bool = False  # gemma4_unified (12B)
    audio: bool = False  # ships an audio tower
    centroid_head: bool = False  # drafter uses ordered embeddings + centroids
    num_centroids: int = 32
    centroid_top_k: int = 4
    unused_shared_kv: bool = False  # checkpoint carries unused k/v tensors for KV-shared layers
    # q/k norm weights ~ gain * d**-0.25: high enough that greedy text does not collapse into one
    # repeated token, low enough that float32 logits stay within ~5e-5 of float64 (tuned per variant:
    # larger gains make attention so peaked that float32 rounding grows to 1e-3 and beyond).
    qk_norm_gain: float = 1.25
    # Vision tower options of the real checkpoints: E2B/E4B clip their linears' inputs and outputs,
    # 26B/31B also standardize the pooled features (std_bias/std_scale); 72 is the 26B's head dim,
    # not a power of two, so the 26B miniature uses 12.
    vision_clipped: bool = False
    vision_standardize: bool = False
    vision_head_dim: int = 16

    @property
    def k_eq_v(self) -> bool:
        return self.num_global_kv_heads is not None

    @property
    def layer_types(self) -> list[str]:
        period = self.sliding_per_full + 1
        return [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(self.num_layers)
        ]

    @property
    def shared_layers(self) -> range:
        return range(self.num_layers - self.kv_shared, self.num_layers)

    def kv_heads_for(self, layer_type: str) -> int:
        if layer_type == "full_attention" and self.k_eq_v:
            return self.num_global_kv_heads
        return self.num_kv_heads

    @staticmethod
    def head_dim_for(layer_type: str) -> int:
        return GLOBAL_HEAD_DIM if layer_type == "full_attention" else HEAD_DIM


SPECS = {
    "e2b": VariantSpec(
        name="e2b", num_layers=10, sliding_per_full=4, num_heads=4, num_kv_heads=1, intermediate=128,
        sliding_window=16, ple_dim=16, kv_shared=4, double_wide_mlp=True, audio=True,
        centroid_head=True, unused_shared_kv=True, qk_norm_gain=1.0, vision_clipped=True,
    ),
    "e4b": VariantSpec(
        name="e4b", num_layers=12, sliding_per_full=5, num_heads=4, num_kv_heads=2, intermediate=96,
        sliding_window=16, ple_dim=8, kv_shared=4, double_wide_mlp=True, audio=True, centroid_head=True,
        qk_norm_gain=0.8, vision_clipped=True,
    ),
    "12b": VariantSpec(
        name="12b", num_layers=6, sliding_per_full=5, num_heads=4, num_kv_heads=2, intermediate=128,
        sliding_window=24, num_global_kv_heads=1, unified=True, qk_norm_gain=1.25,
    ),
    "26b": VariantSpec(
        name="26b", num_layers=6, sliding_per_full=5, num_heads=4, num_kv_heads=2, intermediate=64,
        sliding_window=24, num_global_kv_heads=1, moe=MoESpec(num_experts=4, top_k=2, intermediate=32),
        qk_norm_gain=1.25, vision_clipped=True, vision_standardize=True, vision_head_dim=12,
    ),
    "31b": VariantSpec(
        name="31b", num_layers=6, sliding_per_full=5, num_heads=4, num_kv_heads=2, intermediate=160,
        sliding_window=24, num_global_kv_heads=1, qk_norm_gain=1.4, vision_clipped=True,
        vision_standardize=True,
    ),
}


def spec_for(variant: str) -> VariantSpec:
    if variant not in SPECS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return SPECS[variant]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _text_config_kwargs(spec: VariantSpec) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=HEAD_DIM,
        global_head_dim=GLOBAL_HEAD_DIM,
        sliding_window=spec.sliding_window,
        layer_types=spec.layer_types,
        final_logit_softcapping=SOFTCAP,
        tie_word_embeddings=True,
        attention_k_eq_v=spec.k_eq_v,
        num_kv_shared_layers=spec.kv_shared,
        use_double_wide_mlp=spec.double_wide_mlp,
        eos_token_id=EOS_IDS,
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
    )
    if spec.k_eq_v:
        kw["num_global_key_value_heads"] = spec.num_global_kv_heads
    if not spec.unified:  # gemma4_unified_text has no PLE / MoE fields at all
        kw.update(
            hidden_size_per_layer_input=spec.ple_dim,
            vocab_size_per_layer_input=VOCAB,
            enable_moe_block=spec.moe is not None,
        )
        if spec.moe is not None:
            kw.update(
                num_experts=spec.moe.num_experts,
                top_k_experts=spec.moe.top_k,
                moe_intermediate_size=spec.moe.intermediate,
            )
    return kw


def _target_config(spec: VariantSpec):
    import transformers as tf

    if spec.unified:
        return tf.Gemma4UnifiedConfig(
            text_config=tf.Gemma4UnifiedTextConfig(**_text_config_kwargs(spec)),
            # encoder-free: 3x3 groups of 2-px patches go straight into embed_vision (6x6x3 = 108 raw
            # values per merged patch, as 48x48x3 on the real model); the position table covers the
            # longest side (in merged patches) of any image at soft-token budgets up to 140.
            vision_config=tf.Gemma4UnifiedVisionConfig(
                patch_size=MINI_PATCH[True], pooling_kernel_size=3, mm_embed_dim=32, mm_posemb_size=VISION_POSITIONS // 2,
                output_proj_dims=32,
            ),
            audio_config=tf.Gemma4UnifiedAudioConfig(audio_embed_dim=32),
            tie_word_embeddings=True,
        )
    # 4-px patches pooled 3x3 as on the real models (16-px patches); the position table covers the
    # longest side (budget x 3 patches, a 1-patch-high strip) of any image at budgets up to 140.
    vision = tf.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=spec.vision_head_dim, pooling_kernel_size=3, patch_size=MINI_PATCH[False],
        position_embedding_size=VISION_POSITIONS, use_clipped_linears=spec.vision_clipped,
        standardize=spec.vision_standardize,
    )
    audio = None
    if spec.audio:
        audio = tf.Gemma4AudioConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
            output_proj_dims=32, attention_chunk_size=4, attention_context_left=5,
        )
    return tf.Gemma4Config(
        text_config=tf.Gemma4TextConfig(**_text_config_kwargs(spec)),
        vision_config=vision,
        audio_config=audio,
        tie_word_embeddings=True,
    )


def _drafter_text_kwargs(spec: VariantSpec) -> dict:
    # The drafter attends to the target's K/V, so its head dims and KV head counts must match
    # the target's producer layers of the same type.
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=DRAFT_HIDDEN,
        intermediate_size=DRAFT_INTERMEDIATE,
        num_hidden_layers=len(DRAFT_LAYERS),
        num_attention_heads=DRAFT_HEADS,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=HEAD_DIM,
        global_head_dim=GLOBAL_HEAD_DIM,
        sliding_window=spec.sliding_window,
        layer_types=list(DRAFT_LAYERS),
        tie_word_embeddings=True,
        attention_k_eq_v=spec.k_eq_v,
        num_kv_shared_layers=len(DRAFT_LAYERS),
        use_double_wide_mlp=False,
        eos_token_id=EOS_IDS,
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
    )
    if spec.k_eq_v:
        kw["num_global_key_value_heads"] = spec.num_global_kv_heads
    if not spec.unified:
        kw.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False)
    return kw


def _drafter_config(spec: VariantSpec):
    import transformers as tf

    head = dict(backbone_hidden_size=HIDDEN, tie_word_embeddings=True)
    if spec.centroid_head:
        head.update(
            use_ordered_embeddings=True,
            num_centroids=spec.num_centroids,
            centroid_intermediate_top_k=spec.centroid_top_k,
        )
    else:
        head.update(use_ordered_embeddings=False)
    if spec.unified:
        text = tf.Gemma4UnifiedTextConfig(**_drafter_text_kwargs(spec))
        return tf.Gemma4UnifiedAssistantConfig(text_config=text, **head)
    text = tf.Gemma4TextConfig(**_drafter_text_kwargs(spec))
    return tf.Gemma4AssistantConfig(text_config=text, **head)


def _restyle_text_config(text: dict, spec: VariantSpec, config_style: str) -> dict:
    """Rewrite a transformers-5.22 text_config dict into the requested serialization."""
    if config_style == "per_layer":
        return text  # what transformers 5.22 writes
    if config_style != "google":
        raise ValueError(f"unknown config_style {config_style!r}; expected one of {CONFIG_STYLES}")
    # transformers 5.7 / Google's upload: flat global_head_dim (+ num_global_key_value_heads), no per_layer_config
    text = dict(text)
    text.pop("per_layer_config", None)
    text["global_head_dim"] = GLOBAL_HEAD_DIM
    if spec.k_eq_v:
        text["num_global_key_value_heads"] = spec.num_global_kv_heads
    return text


def _rewrite_config(model_dir: Path, spec: VariantSpec, config_style: str) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["text_config"] = _restyle_text_config(config["text_config"], spec, config_style)
    # mlx-lm defaults vocab_size to 262144 when it is missing at the top level
    config["vocab_size"] = VOCAB
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_generation_config(model_dir: Path) -> None:
    gen = {"bos_token_id": BOS_ID, "eos_token_id": list(EOS_IDS), "pad_token_id": PAD_ID}
    (model_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _generator(seed: int, name: str):
    import torch

    # Seed per tensor name so values do not depend on iteration order or config style.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_tensor(name: str, shape, dtype, seed: int, qk_norm_gain: float = 1.25):
    """The value a tensor called `name` gets; also used for the injected unused k/v tensors."""
    import torch

    gen = _generator(seed, name)
    shape = tuple(shape)
    if not dtype.is_floating_point:  # token_ordering: a permutation of the vocabulary
        return torch.randperm(shape[0], generator=gen).to(dtype)
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_min", "output_min"):
        return -(4.0 + torch.rand(shape, generator=gen))
    if leaf in ("input_max", "output_max"):
        return 4.0 + torch.rand(shape, generator=gen)
    if leaf == "layer_scalar":
        # Below 1 so the token's own embedding fades against later layers' outputs; otherwise the
        # tied head keeps predicting the input token and greedy decoding repeats it forever.
        return LAYER_SCALAR_LOW + 0.3 * torch.rand(shape, generator=gen)
    if leaf == "per_expert_scale":
        return 0.6 + 0.8 * torch.rand(shape, generator=gen)
    if leaf == "bias":
        return 0.05 * torch.randn(shape, generator=gen)
    if leaf == "weight" and name.endswith(("q_norm.weight", "k_norm.weight")):
        # Attention scale is 1.0 (q/k norms instead of 1/sqrt(d)); weights near d**-0.25 keep the
        # q.k logits around unit std. Near 1 they reach std ~sqrt(d), attention becomes so peaked
        # that cached and uncached forwards drift apart by 1e-1 after a few dozen tokens.
        return qk_norm_gain * shape[0] ** -0.25 * (1.0 + 0.15 * torch.randn(shape, generator=gen))
    if len(shape) <= 1:
        # Gemma4RMSNorm multiplies by `weight` itself (no 1 + w offset), so norms live around 1.
        return 1.0 + 0.15 * torch.randn(shape, generator=gen)
    # Matrices: unit-variance outputs; the embedding a bit larger so logits are well separated.
    values = torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        # Equal-norm rows: with random norms a few "hub" tokens win every argmax and greedy
        # decoding collapses into one repeated token.
        return EMBED_ROW_NORM * values / values.norm(dim=-1, keepdim=True)
    return values * shape[-1] ** -0.5


def _randomize(model, seed: int, qk_norm_gain: float) -> None:
    import torch

    seen = set()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied lm_head
                continue
            seen.add(tensor.data_ptr())
            tensor.copy_(random_tensor(name, tensor.shape, tensor.dtype, seed, qk_norm_gain))


def _inject_unused_shared_kv(model_dir: Path, spec: VariantSpec, seed: int) -> list[str]:
    """Add the k_proj/v_proj/k_norm tensors that the real E2B ships for its KV-shared layers."""
    import torch
    from safetensors.torch import load_file, save_file

    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    added = []
    for i in spec.shared_layers:
        layer_type = spec.layer_types[i]
        head_dim = spec.head_dim_for(layer_type)
        kv_dim = spec.kv_heads_for(layer_type) * head_dim
        prefix = f"model.language_model.layers.{i}.self_attn."
        shard = weight_map[prefix + "q_proj.weight"]  # keep them next to the layer's other tensors
        tensors = load_file(str(model_dir / shard))
        for leaf, shape in (("k_proj.weight", (kv_dim, HIDDEN)), ("v_proj.weight", (kv_dim, HIDDEN)),
                            ("k_norm.weight", (head_dim,))):
            name = prefix + leaf
            tensors[name] = random_tensor(name, shape, torch.float32, seed, spec.qk_norm_gain).contiguous()
            weight_map[name] = shard
            meta = index["metadata"]
            meta["total_size"] = meta.get("total_size", 0) + 4 * tensors[name].numel()
            if "total_parameters" in meta:
                meta["total_parameters"] += tensors[name].numel()
            added.append(name)
        save_file(tensors, str(model_dir / shard), metadata={"format": "pt"})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return added


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
TURN_OPEN_ID, TURN_CLOSE_ID = 105, 106


def special_tokens() -> list[str]:
    """Ids 0..106 in Gemma's order; the gap between <unk> and <|turn> is filled with unused specials."""
    head = ["<pad>", "<eos>", "<bos>", "<unk>"]
    unused = [f"<unused_{i}>" for i in range(TURN_OPEN_ID - len(head))]
    return head + unused + [TURN_OPEN, TURN_CLOSE]


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to speak in tokens, one after
another, and a smaller model guesses the next few so the large one can check them all at once.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
{"name": "gemma", "layers": [1, 2, 3], "sliding": true, "window": 512, "heads": 8}
Speculative decoding drafts several tokens with a cheap model, then verifies them with the target
in a single forward pass. When the draft agrees with the target, many tokens are accepted per step;
when it disagrees, the target's own token is kept and drafting starts again from there.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 3.14159 2.71828
The weather is nice and the river runs through the valley where the old mill stands by the bridge.
import numpy as np
x = np.arange(10)
print(x.sum(), x.mean(), x.max())
Once upon a time there was a tiny transformer that wanted to predict the future of every sentence.
"""


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"tokenizer trained to {tok.get_vocab_size()} tokens, expected {VOCAB}")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return tok.to_str()


@lru_cache(maxsize=1)
def _spm_tokenizer_json() -> str:
    """Gemma's style: tokens carry their leading space as "\u2581", and decoding turns it back into
    a space without stripping the first one (mlx-lm picks its SPM streaming detokenizer for it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581+|\n"), behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=1, special_tokens=special_tokens(),
                                  show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT.replace(" ", "\u2581")] * 4, trainer=trainer)
    if tok.get_vocab_size() > VOCAB:
        raise RuntimeError(f"tokenizer trained to {tok.get_vocab_size()} tokens, expected at most {VOCAB}")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return tok.to_str()


def write_tokenizer(model_dir: Path, style: str = "bpe") -> None:
    """style "bpe": byte-level BPE; "spm": Gemma's own style (see _spm_tokenizer_json)."""
    model_dir = Path(model_dir)
    (model_dir / "tokenizer.json").write_text(_spm_tokenizer_json() if style == "spm" else _tokenizer_json())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _fresh_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


def _model_class(model_type: str):
    import transformers as tf

    return {
        "gemma4": tf.Gemma4ForConditionalGeneration,
        "gemma4_unified": tf.Gemma4UnifiedForConditionalGeneration,
        "gemma4_assistant": tf.Gemma4AssistantForCausalLM,
        "gemma4_unified_assistant": tf.Gemma4UnifiedAssistantForCausalLM,
    }[model_type]


def _shard_size(model) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return max(total // TARGET_SHARDS, 1)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars are noise in test logs


def build_target(variant: str, out_dir, *, config_style: str = "google", seed: int = 0) -> Path:
    """Write a miniature target checkpoint (multimodal wrapper, sharded, float32) and return its folder."""
    import torch

    spec = spec_for(variant)
    out_dir = _fresh_dir(out_dir)
    _quiet_transformers()
    config = _target_config(spec)
    torch.manual_seed(seed)
    model = _model_class(config.model_type)(config).to(torch.float32).eval()
    _randomize(model, seed, spec.qk_norm_gain)
    model.save_pretrained(out_dir, max_shard_size=_shard_size(model))
    if spec.unused_shared_kv:
        _inject_unused_shared_kv(out_dir, spec, seed)
    _rewrite_config(out_dir, spec, config_style)
    _write_generation_config(out_dir)
    write_tokenizer(out_dir)
    return out_dir


def build_drafter(variant: str, out_dir, *, config_style: str = "google", seed: int = 0) -> Path:
    """Write the matching MTP drafter (`-assistant`) checkpoint (one model.safetensors)."""
    import torch

    spec = spec_for(variant)
    out_dir = _fresh_dir(out_dir)
    _quiet_transformers()
    config = _drafter_config(spec)
    torch.manual_seed(seed)
    model = _model_class(config.model_type)(config).to(torch.float32).eval()
    _randomize(model, seed + 1, spec.qk_norm_gain)  # a different stream from the target's
    model.save_pretrained(out_dir)
    _rewrite_config(out_dir, spec, config_style)
    _write_generation_config(out_dir)
    return out_dir


def build_pair(variant: str, root, *, config_style: str = "google", seed: int = 0) -> tuple[Path, Path]:
    root = Path(root)
    target = build_target(variant, root / f"gemma-4-{variant}-it", config_style=config_style, seed=seed)
    drafter = build_drafter(variant, root / f"gemma-4-{variant}-it-assistant", config_style=config_style, seed=seed)
    return target, drafter


# --------------------------------------------------------------------------------------------
# Reference loaders
# --------------------------------------------------------------------------------------------


def _load(model_dir, **kwargs):
    import torch

    model_dir = Path(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    model, info = _model_class(model_type).from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **kwargs
    )
    return model.eval(), info


def load_reference_target(target_dir, *, return_loading_info: bool = False):
    """The transformers multimodal wrapper, float32, eval, eager attention."""
    model, info = _load(target_dir)
    return (model, info) if return_loading_info else model


def load_reference_drafter(draft_dir, *, num_assistant_tokens: int = 4, return_loading_info: bool = False):
    """The transformers assistant model, ready for `generate(..., assistant_model=...)`."""
    model, info = _load(draft_dir)
    # The MTP candidate generator reads the draft length from the assistant's generation config.
    model.generation_config.num_assistant_tokens = num_assistant_tokens
    return (model, info) if return_loading_info else model


def reference_tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target_dir))


def reference_image_processor(variant: str, max_soft_tokens: int):
    """transformers' own image processor for a miniature: the towers' Pillow backend, or the
    12B's `Gemma4UnifiedImageProcessor` (torchvision is its only backend)."""
    unified = spec_for(variant).unified
    return image_processor(MINI_PATCH[unified], 3, max_soft_tokens, unified=unified)


def image_processor(patch_size: int, pooling_kernel_size: int, max_soft_tokens: int, *, unified: bool):
    """transformers' image processor for any geometry (real sizes included)."""
    if unified:
        return UnifiedImageProcessor(patch_size, pooling_kernel_size, max_soft_tokens)
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size,
                                   max_soft_tokens=max_soft_tokens)


@lru_cache(maxsize=None)
def _unified_functions() -> dict:
    """The functions of transformers' `image_processing_gemma4_unified` module, run from its source:
    the module imports torchvision at the top, whose Linux wheel needs CUDA torch (this suite runs
    the CPU one), and they use only torch."""
    import ast
    import math

    import torch
    import transformers.models.gemma4_unified as unified

    source = (Path(unified.__file__).parent / "image_processing_gemma4_unified.py").read_text()
    functions = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module(functions, []), "image_processing_gemma4_unified", "exec"), namespace)
    return namespace


class UnifiedImageProcessor:
    """`Gemma4UnifiedImageProcessor` (the 12B's; torchvision its only backend), step for step as its
    `process_image` and `_preprocess`: the backend's RGB conversion; the module's own size, patch,
    merge and pad functions; torch's antialiased bicubic on the uint8 image, the kernel that
    torchvision's `resize` calls for uint8 on the CPU; the backend's `image * scale` rescale.
    Against the real processor (torchvision 0.28 with its detection ops' registrations skipped)
    it gave the same pixels on 280 images."""

    def __init__(self, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int):
        self.patch_size, self.k, self.max_soft_tokens = patch_size, pooling_kernel_size, max_soft_tokens

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        import torch
        from transformers.image_transforms import convert_to_rgb

        f = _unified_functions()
        pixel_values, position_ids, counts = [], [], []
        for img in images:
            image = torch.from_numpy(convert_to_rgb(img, return_numpy=True)).permute(2, 0, 1)
            height, width = f["get_aspect_ratio_preserving_size"](
                image.shape[1], image.shape[2], self.patch_size, self.max_soft_tokens * self.k**2, self.k)
            if (height, width) != tuple(image.shape[1:]):
                image = torch.nn.functional.interpolate(image[None], size=(height, width), mode="bicubic",
                                                        align_corners=False, antialias=True)[0]
            image = image * (1 / 255)
            patches = f["convert_image_to_patches"](image, self.patch_size)
            grid = torch.meshgrid(torch.arange(width // self.patch_size), torch.arange(height // self.patch_size),
                                  indexing="xy")
            positions = torch.stack(grid, dim=-1).reshape(patches.shape[0], 2)
            merged, merged_positions = f["patches_merge"](patches[None], positions[None], patches.shape[0] // self.k**2)
            counts.append(merged.shape[1])
            merged, merged_positions = f["pad_along_first_dim"](merged[0], merged_positions[0], self.max_soft_tokens)
            pixel_values.append(merged)
            position_ids.append(merged_positions)
        out = {"pixel_values": torch.stack(pixel_values), "image_position_ids": torch.stack(position_ids),
               "num_soft_tokens_per_image": counts}
        if return_tensors == "np":
            out = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out


# --------------------------------------------------------------------------------------------
# mlx-community style drafter (independent of project code)
# --------------------------------------------------------------------------------------------

QUANT_GROUP = 64


def _should_quantize(name: str, shape) -> bool:
    # Linear / Embedding weights only; norms and scalars are 1-D, token_ordering is not a weight.
    return name.endswith(".weight") and len(shape) == 2 and shape[-1] % QUANT_GROUP == 0


def write_mlx_community_drafter(draft_dir, out_dir, bits: int = 4) -> Path:
    """Quantize a drafter folder the way mlx-community conversions do: HF names, affine group 64."""
    import mlx.core as mx

    draft_dir, out_dir = Path(draft_dir), _fresh_dir(out_dir)
    weights = {}
    for file in sorted(draft_dir.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    out = {}
    for name, w in sorted(weights.items()):
        if name.endswith("token_ordering"):
            out[name] = w.astype(mx.int32)  # some conversions store it as int32
        elif _should_quantize(name, w.shape):
            q, scales, biases = mx.quantize(w, group_size=QUANT_GROUP, bits=bits)
            base = name[: -len(".weight")]
            out[name] = q
            out[base + ".scales"] = scales
            out[base + ".biases"] = biases
        else:
            out[name] = w
    mx.save_safetensors(str(out_dir / "model.safetensors"), out, metadata={"format": "mlx"})
    config = json.loads((draft_dir / "config.json").read_text())
    config["quantization"] = {"group_size": QUANT_GROUP, "bits": bits}
    config["quantization_config"] = {"group_size": QUANT_GROUP, "bits": bits}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in ("generation_config.json",):
        if (draft_dir / extra).exists():
            shutil.copy(draft_dir / extra, out_dir / extra)
    return out_dir


# --------------------------------------------------------------------------------------------
# Small helpers for tests
# --------------------------------------------------------------------------------------------


def read_index(model_dir) -> dict:
    return json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())


def checkpoint_shapes(model_dir) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string) for every tensor in a folder, read from safetensors headers."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


# --------------------------------------------------------------------------------------------
# mlx-community style target (what mlx-vlm writes; independent of project code)
# --------------------------------------------------------------------------------------------


VISION_PARTS = ("vision_tower.", "embed_vision.", "vision_embedder.")


def write_mlx_community_target(mlx_target_dir, hf_target_dir, out_dir, *, vision_bits: int | None = None,
                               vision_group_size: int = 32) -> Path:
    """An mlx-vlm conversion of a target: the mlx-lm text weights (`language_model.model.*`) of
    `mlx_target_dir`, plus the vision and audio towers under `vision_tower.*` / `audio_tower.*` /
    `embed_vision.*` / `embed_audio.*` from the Hugging Face checkpoint, Google's config with
    `vision_config` / `audio_config`, and `quantization_config` beside `quantization`.

    With `vision_bits`, every vision linear whose input size the group divides is stored affine
    quantized (`weight`/`scales`/`biases`) and named in `quantization` with its own group size, the
    way mlx-vlm records per-module settings (the miniature's 32-wide layers need groups of 32)."""
    import mlx.core as mx

    src, hf, out = Path(mlx_target_dir), Path(hf_target_dir), _fresh_dir(out_dir)
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        # the text part only: the towers come from the Hugging Face checkpoint below
        weights.update({k: v for k, v in mx.load(str(f)).items() if not k.startswith(VISION_PARTS)})
    towers = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
              "model.vision_embedder.")
    per_module = {}
    for f in sorted(hf.glob("model*.safetensors")):
        for name, value in mx.load(str(f)).items():
            if not name.startswith(towers):
                continue
            name = name[len("model."):]
            quantizable = name.endswith(".weight") and value.ndim == 2 and value.shape[-1] % vision_group_size == 0
            if vision_bits and name.startswith(VISION_PARTS) and quantizable:
                base = name[: -len(".weight")]
                weights[name], weights[base + ".scales"], weights[base + ".biases"] = mx.quantize(
                    value, group_size=vision_group_size, bits=vision_bits
                )
                per_module[base] = {"group_size": vision_group_size, "bits": vision_bits}
            else:
                weights[name] = value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((hf / "config.json").read_text())
    mlx_config = json.loads((src / "config.json").read_text())
    quantization = dict(mlx_config.get("quantization") or {})
    if per_module:
        quantization = {"group_size": QUANT_GROUP, "bits": vision_bits, **quantization, **per_module}
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    return out
