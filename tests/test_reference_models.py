"""Checks that the fabricated miniature checkpoints have the layout of Google's Gemma 4 uploads
and that the transformers reference runs them (both config styles, assisted generation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import reference_models as rm

STYLES = rm.CONFIG_STYLES
PROMPT = [{"role": "user", "content": "Write a fibonacci function in python."}]

LM = "model.language_model."
EXPECTED_PREFIXES = {
    "e2b": {"model.language_model", "model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"},
    "e4b": {"model.language_model", "model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"},
    # gemma4_unified is encoder-free: patches and waveform frames go straight into the embedders.
    # save_pretrained reverses transformers' load-time renaming, so the patch embedder is written
    # under the original checkpoint name `model.vision_embedder.*`.
    "12b": {"model.language_model", "model.vision_embedder", "model.embed_vision", "model.embed_audio"},
    "26b": {"model.language_model", "model.vision_tower", "model.embed_vision"},
    "31b": {"model.language_model", "model.vision_tower", "model.embed_vision"},
}
ALL_PAIRS = [(v, s) for v in rm.VARIANTS for s in STYLES]


def _shard_keys(model_dir: Path) -> dict[str, set[str]]:
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out[file.name] = set(f.keys())
    return out


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _tensor(model_dir: Path, name: str) -> torch.Tensor:
    index_path = model_dir / "model.safetensors.index.json"
    shard = json.loads(index_path.read_text())["weight_map"][name] if index_path.exists() else "model.safetensors"
    with safe_open(str(model_dir / shard), framework="pt") as f:
        return f.get_tensor(name)


def _prompt_ids(target_dir: Path) -> torch.Tensor:
    tok = rm.reference_tokenizer(target_dir)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


# ---------------------------------------------------------------------------------------------
# Target layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,style", ALL_PAIRS)
def test_target_shards_and_index_are_consistent(reference_pair, variant, style):
    target, _ = reference_pair(variant, style)
    index = rm.read_index(target)
    shards = _shard_keys(target)
    assert len(shards) >= 2
    assert set(index["weight_map"].values()) == set(shards)
    for name, shard in index["weight_map"].items():
        assert name in shards[shard], f"{name} not in {shard}"
    all_keys = set().union(*shards.values())
    assert all_keys == set(index["weight_map"])
    assert sum(len(k) for k in shards.values()) == len(all_keys), "a tensor is stored twice"
    shapes = rm.checkpoint_shapes(target)
    assert index["metadata"]["total_size"] == sum(4 * int(np.prod(s)) for s, _ in shapes.values())
    assert {dtype for _, dtype in shapes.values()} == {"F32"}
    assert not (target / "model.safetensors").exists()


@pytest.mark.parametrize("variant,style", ALL_PAIRS)
def test_target_keys_and_config(reference_pair, variant, style):
    spec = rm.spec_for(variant)
    target, _ = reference_pair(variant, style)
    keys = set(rm.read_index(target)["weight_map"])
    assert {".".join(k.split(".")[:2]) for k in keys} == EXPECTED_PREFIXES[variant]
    assert "lm_head.weight" not in keys  # tied to embed_tokens
    assert keys >= {LM + "embed_tokens.weight", LM + "norm.weight"}
    assert all(f"{LM}layers.{i}.layer_scalar" in keys for i in range(spec.num_layers))
    assert (LM + "embed_tokens_per_layer.weight" in keys) == (spec.ple_dim > 0)

    config = _config(target)
    text = config["text_config"]
    assert config["model_type"] == ("gemma4_unified" if spec.unified else "gemma4")
    assert config["architectures"] == [
        "Gemma4UnifiedForConditionalGeneration" if spec.unified else "Gemma4ForConditionalGeneration"
    ]
    assert config["vocab_size"] == text["vocab_size"] == rm.VOCAB
    assert text["hidden_size"] == rm.HIDDEN and text["head_dim"] == rm.HEAD_DIM
    assert text["sliding_window"] == spec.sliding_window
    assert text["final_logit_softcapping"] == 30.0 and text["tie_word_embeddings"] is True
    assert text["layer_types"] == spec.layer_types
    assert text["num_kv_shared_layers"] == spec.kv_shared
    assert text["attention_k_eq_v"] == spec.k_eq_v
    if not spec.unified:
        assert text["vocab_size_per_layer_input"] == rm.VOCAB
        assert text["hidden_size_per_layer_input"] == spec.ple_dim
        assert text["enable_moe_block"] == (spec.moe is not None)
    if style == "google":
        assert "per_layer_config" not in text
        assert text["global_head_dim"] == rm.GLOBAL_HEAD_DIM
        assert text.get("num_global_key_value_heads") == spec.num_global_kv_heads
    else:
        assert "global_head_dim" not in text and "num_global_key_value_heads" not in text
        full = [i for i, t in enumerate(spec.layer_types) if t == "full_attention"]
        assert sorted(int(i) for i in text["per_layer_config"]) == full
        assert all(v["head_dim"] == rm.GLOBAL_HEAD_DIM for v in text["per_layer_config"].values())

    gen = json.loads((target / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106] and gen["bos_token_id"] == 2 and gen["pad_token_id"] == 0


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_attention_tensor_shapes(reference_pair, variant):
    spec = rm.spec_for(variant)
    target, _ = reference_pair(variant)
    shapes = {k: s for k, (s, _) in rm.checkpoint_shapes(target).items()}
    for i, layer_type in enumerate(spec.layer_types):
        p = f"{LM}layers.{i}.self_attn."
        hd = spec.head_dim_for(layer_type)
        assert shapes[p + "q_proj.weight"] == (spec.num_heads * hd, rm.HIDDEN)
        assert shapes[p + "o_proj.weight"] == (rm.HIDDEN, spec.num_heads * hd)
        assert shapes[p + "q_norm.weight"] == (hd,)
        shared = i in spec.shared_layers
        if shared and not spec.unused_shared_kv:
            assert p + "k_proj.weight" not in shapes and p + "v_proj.weight" not in shapes
            continue
        kv = spec.kv_heads_for(layer_type) * hd
        assert shapes[p + "k_proj.weight"] == (kv, rm.HIDDEN)
        assert shapes[p + "k_norm.weight"] == (hd,)
        k_eq_v = spec.k_eq_v and layer_type == "full_attention"
        assert (p + "v_proj.weight" in shapes) == (not k_eq_v)


def test_e2b_ships_unused_kv_for_shared_layers(reference_pair):
    spec = rm.spec_for("e2b")
    target, _ = reference_pair("e2b")
    shapes = {k: s for k, (s, _) in rm.checkpoint_shapes(target).items()}
    assert len(spec.shared_layers) == 4
    non_shared = spec.layer_types[: spec.shared_layers.start]
    assert {"sliding_attention", "full_attention"} <= set(non_shared)
    for i in spec.shared_layers:
        hd = spec.head_dim_for(spec.layer_types[i])
        p = f"{LM}layers.{i}.self_attn."
        assert shapes[p + "k_proj.weight"] == (spec.num_kv_heads * hd, rm.HIDDEN)
        assert shapes[p + "v_proj.weight"] == (spec.num_kv_heads * hd, rm.HIDDEN)
        assert shapes[p + "k_norm.weight"] == (hd,)
        # double-wide MLP only on the KV-shared layers
        assert shapes[f"{LM}layers.{i}.mlp.gate_proj.weight"] == (2 * spec.intermediate, rm.HIDDEN)
    assert shapes[f"{LM}layers.0.mlp.gate_proj.weight"] == (spec.intermediate, rm.HIDDEN)
    # e4b does not carry them (transformers never writes them)
    e4b, _ = reference_pair("e4b")
    e4b_keys = set(rm.read_index(e4b)["weight_map"])
    assert not any(f"layers.{i}.self_attn.k_proj" in k for i in rm.spec_for("e4b").shared_layers for k in e4b_keys)


def test_26b_packs_experts_in_3d_tensors(reference_pair):
    spec = rm.spec_for("26b")
    target, _ = reference_pair("26b")
    shapes = {k: s for k, (s, _) in rm.checkpoint_shapes(target).items()}
    moe = spec.moe
    for i in range(spec.num_layers):
        p = f"{LM}layers.{i}."
        assert shapes[p + "experts.gate_up_proj"] == (moe.num_experts, 2 * moe.intermediate, rm.HIDDEN)
        assert shapes[p + "experts.down_proj"] == (moe.num_experts, rm.HIDDEN, moe.intermediate)
        assert shapes[p + "router.proj.weight"] == (moe.num_experts, rm.HIDDEN)
        assert shapes[p + "router.scale"] == (rm.HIDDEN,)
        assert shapes[p + "router.per_expert_scale"] == (moe.num_experts,)
        for norm in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
            assert shapes[p + norm + ".weight"] == (rm.HIDDEN,)
        assert shapes[p + "mlp.gate_proj.weight"] == (spec.intermediate, rm.HIDDEN)  # the dense MLP stays
    assert not any(k.endswith("gate_up_proj.weight") for k in shapes)


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_every_tensor_is_randomized(reference_pair, variant):
    target, draft = reference_pair(variant)
    for folder in (target, draft):
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if not t.is_floating_point():
                        continue
                    assert torch.isfinite(t).all(), name
                    if t.numel() > 1:
                        assert t.std() > 0, f"{name} is constant"
                    assert not torch.all(t == 1) and not torch.all(t == 0), f"{name} left at init value"


def test_seeds_are_deterministic(tmp_path):
    a = rm.build_drafter("e2b", tmp_path / "a", seed=3)
    b = rm.build_drafter("e2b", tmp_path / "b", seed=3)
    c = rm.build_drafter("e2b", tmp_path / "c", seed=4)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(_tensor(a, name), _tensor(b, name))
    assert not torch.equal(_tensor(a, name), _tensor(c, name))


# ---------------------------------------------------------------------------------------------
# Drafter layout
# ---------------------------------------------------------------------------------------------


def _expected_drafter_keys(spec: rm.VariantSpec) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "pre_projection.weight", "post_projection.weight"}
    for i in range(len(rm.DRAFT_LAYERS)):
        p = f"model.layers.{i}."
        keys |= {p + "layer_scalar"}
        keys |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "q_norm", "o_proj")}
        keys |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        keys |= {
            p + f"{n}.weight"
            for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
        }
    if spec.centroid_head:
        keys |= {"masked_embedding.centroids.weight", "masked_embedding.token_ordering"}
    return keys


@pytest.mark.parametrize("variant,style", ALL_PAIRS)
def test_drafter_keys_and_config(reference_pair, variant, style):
    spec = rm.spec_for(variant)
    _, draft = reference_pair(variant, style)
    assert sorted(p.name for p in draft.glob("*.safetensors")) == ["model.safetensors"]
    shapes = rm.checkpoint_shapes(draft)
    assert set(shapes) == _expected_drafter_keys(spec)  # no lm_head, no k/v projections
    assert shapes["pre_projection.weight"][0] == (rm.DRAFT_HIDDEN, 2 * rm.HIDDEN)
    assert shapes["post_projection.weight"][0] == (rm.HIDDEN, rm.DRAFT_HIDDEN)
    assert shapes["model.layers.3.self_attn.q_proj.weight"][0] == (rm.DRAFT_HEADS * rm.GLOBAL_HEAD_DIM, rm.DRAFT_HIDDEN)
    assert shapes["model.layers.0.self_attn.q_proj.weight"][0] == (rm.DRAFT_HEADS * rm.HEAD_DIM, rm.DRAFT_HIDDEN)

    config = _config(draft)
    text = config["text_config"]
    assert config["model_type"] == ("gemma4_unified_assistant" if spec.unified else "gemma4_assistant")
    assert config["backbone_hidden_size"] == rm.HIDDEN
    assert config["use_ordered_embeddings"] == spec.centroid_head
    assert text["layer_types"] == rm.DRAFT_LAYERS and text["num_kv_shared_layers"] == 4
    assert text["hidden_size"] == rm.DRAFT_HIDDEN and text["sliding_window"] == spec.sliding_window
    assert text["num_key_value_heads"] == spec.num_kv_heads
    assert text.get("use_double_wide_mlp", False) is False
    if not spec.unified:
        assert text["hidden_size_per_layer_input"] == 0 and text["vocab_size_per_layer_input"] == 0
        assert text["enable_moe_block"] is False
    assert ("per_layer_config" in text) == (style == "per_layer")
    if style == "google":
        assert text["global_head_dim"] == rm.GLOBAL_HEAD_DIM
        assert text.get("num_global_key_value_heads") == spec.num_global_kv_heads

    if spec.centroid_head:
        assert config["num_centroids"] == 32 and config["centroid_intermediate_top_k"] == 4
        assert shapes["masked_embedding.token_ordering"] == ((rm.VOCAB,), "I64")
        ordering = _tensor(draft, "masked_embedding.token_ordering")
        assert sorted(ordering.tolist()) == list(range(rm.VOCAB))
        assert not torch.equal(ordering, torch.arange(rm.VOCAB))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_ids_and_chat_template_agree_with_mlx_lm(reference_pair):
    from mlx_lm.utils import load_tokenizer

    target, _ = reference_pair("e2b")
    hf = rm.reference_tokenizer(target)
    mlx = load_tokenizer(Path(target))
    assert len(hf) == rm.VOCAB
    expected = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<unused_0>", 105: "<|turn>", 106: "<turn|>"}
    for i, token in expected.items():
        assert hf.convert_ids_to_tokens(i) == token
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (0, 1, 2)

    text = "Hello, world! def f(n): return n <|turn> ünï 🙂"
    ids = hf.encode(text)
    assert ids[0] == 2 and 105 in ids and ids == mlx.encode(text)
    assert hf.decode(ids, skip_special_tokens=True).startswith("Hello, world!")

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n<|turn>user\n2+2?<turn|>\n<|turn>model\n"
    hf_ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert hf_ids == mlx.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_ids.count(2) == 1  # the template's <bos> only


# ---------------------------------------------------------------------------------------------
# transformers reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_both_config_styles_load_to_the_same_model(reference_pair, variant):
    google_t, google_d = reference_pair(variant, "google")
    layer_t, layer_d = reference_pair(variant, "per_layer")
    ids = _prompt_ids(google_t)
    for load, a_dir, b_dir in (
        (rm.load_reference_target, google_t, layer_t),
        (rm.load_reference_drafter, google_d, layer_d),
    ):
        a, info_a = load(a_dir, return_loading_info=True)
        b, info_b = load(b_dir, return_loading_info=True)
        for info in (info_a, info_b):
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    target_a = rm.load_reference_target(google_t)
    target_b = rm.load_reference_target(layer_t)
    with torch.no_grad():
        assert torch.equal(target_a(input_ids=ids).logits, target_b(input_ids=ids).logits)
    # the per-layer head dims really differ between sliding and full layers
    text = target_a.config.get_text_config()
    full = rm.spec_for(variant).layer_types.index("full_attention")
    assert text.per_layer_config[full].head_dim == rm.GLOBAL_HEAD_DIM
    assert text.per_layer_config[0].head_dim == rm.HEAD_DIM


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_loaded_weights_equal_checkpoint(reference_pair, variant):
    """The reference consumes the on-disk tensors (a renamed or dropped tensor would show here)."""
    target, draft = reference_pair(variant)
    model = rm.load_reference_target(target)
    state = model.state_dict()
    index = rm.read_index(target)
    spec = rm.spec_for(variant)
    unused = {
        f"{LM}layers.{i}.self_attn.{n}.weight"
        for i in spec.shared_layers
        for n in ("k_proj", "v_proj", "k_norm")
    }
    for name in index["weight_map"]:
        if name.startswith(LM) and name not in unused:
            assert torch.equal(state[name], _tensor(target, name)), name
    text_state = {k for k in state if k.startswith(LM)}
    assert text_state <= set(index["weight_map"])  # nothing the text model uses is missing on disk
    drafter = rm.load_reference_drafter(draft)
    dstate = drafter.state_dict()
    for name in rm.checkpoint_shapes(draft):
        assert torch.equal(dstate[name], _tensor(draft, name).to(dstate[name].dtype)), name
    assert torch.equal(dstate["lm_head.weight"], dstate["model.embed_tokens.weight"])


@pytest.mark.parametrize("variant", rm.VARIANTS)
def test_greedy_is_diverse_and_assisted_generation_matches(reference_pair, variant):
    target_dir, draft_dir = reference_pair(variant)
    target = rm.load_reference_target(target_dir)
    drafter = rm.load_reference_drafter(draft_dir, num_assistant_tokens=3)
    ids = _prompt_ids(target_dir)
    new = 24  # prompt + new tokens run past the sliding window
    assert ids.shape[1] + new > rm.spec_for(variant).sliding_window
    kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = target.generate(ids, **kwargs)
    assisted = target.generate(ids, assistant_model=drafter, **kwargs)
    assert greedy.shape[1] == ids.shape[1] + new
    assert torch.equal(greedy, assisted)

    tokens = greedy[0, ids.shape[1]:].tolist()
    assert len(set(tokens)) >= 4, tokens
    with torch.no_grad():
        logits = target(input_ids=greedy).logits[0, ids.shape[1] - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).sort().values
    assert margins[len(margins) // 2] > 0.1, margins


# ---------------------------------------------------------------------------------------------
# mlx-community style drafter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,bits", [("e2b", 4), ("26b", 8)])
def test_mlx_community_drafter_quantization(reference_pair, mlx_community_drafter, variant, bits):
    import mlx.core as mx

    spec = rm.spec_for(variant)
    _, draft = reference_pair(variant)
    qdir = mlx_community_drafter(variant, bits)
    config = _config(qdir)
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": bits}
    original = mx.load(str(draft / "model.safetensors"))
    quant = mx.load(str(qdir / "model.safetensors"))
    quantized = [k for k in original if k.endswith(".weight") and original[k].ndim == 2]
    assert "model.embed_tokens.weight" in quantized and "pre_projection.weight" in quantized
    for name in quantized:
        base = name[: -len(".weight")]
        assert quant[name].dtype == mx.uint32
        assert quant[name].shape == (original[name].shape[0], original[name].shape[1] * bits // 32)
        back = mx.dequantize(quant[name], quant[base + ".scales"], quant[base + ".biases"], group_size=64, bits=bits)
        err = mx.abs(back - original[name]).max().item()
        assert err < (0.5 if bits == 4 else 0.05) * mx.abs(original[name]).max().item(), name
    for name in original:
        if original[name].ndim == 1 and original[name].dtype == mx.float32:
            assert mx.array_equal(quant[name], original[name]).item(), name
    if spec.centroid_head:
        assert quant["masked_embedding.token_ordering"].dtype == mx.int32
        assert quant["masked_embedding.token_ordering"].tolist() == original["masked_embedding.token_ordering"].tolist()
    assert len(quant) == len(original) + 2 * len(quantized)
