"""The MLX drafter against transformers' Gemma4(Unified)AssistantForCausalLM on random miniatures."""

import json
import math
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM
from transformers.models.gemma4_unified_assistant import (
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
)

from mlx_gemma_mtp.model.config import normalize_draft_config
from mlx_gemma_mtp.model.drafter import DrafterArgs, load_drafter, save_drafter, sliding_mask
from mlx_gemma_mtp.errors import MTPError

# With mlx's CPU workers alive in the same process, multi-threaded torch crawls (~1.7 s for a
# 4-step draft instead of 4 ms on 2 cores).
torch.set_num_threads(1)

VOCAB, HIDDEN, BACKBONE, HEAD_DIM, GLOBAL_HEAD_DIM, WINDOW = 512, 64, 96, 32, 64, 16
LAYER_TYPES = ["sliding_attention"] * 3 + ["full_attention"]


def text_config(unified: bool) -> dict:
    tc = dict(
        model_type="gemma4_unified_text" if unified else "gemma4_text",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        global_head_dim=GLOBAL_HEAD_DIM,
        layer_types=LAYER_TYPES,
        sliding_window=WINDOW,
    )
    if not unified:
        tc.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    return tc


def build_reference(unified: bool, ordered: bool, seed: int, attn: str):
    cls_config, cls_model = (
        (Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM)
        if unified
        else (Gemma4AssistantConfig, Gemma4AssistantForCausalLM)
    )
    config = cls_config(
        text_config=text_config(unified),
        backbone_hidden_size=BACKBONE,
        use_ordered_embeddings=ordered,
        num_centroids=32,
        centroid_intermediate_top_k=4,
    )
    config._attn_implementation = attn
    model = cls_model(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to model.embed_tokens.weight
            if name.endswith("token_ordering"):
                p.copy_(torch.randperm(VOCAB, generator=gen))
            elif name.endswith("layer_scalar"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:  # norms
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model


CASES = {
    "dense": dict(unified=False, ordered=False, seed=1, attn="eager"),
    "centroid": dict(unified=False, ordered=True, seed=2, attn="sdpa"),
    "unified": dict(unified=True, ordered=False, seed=3, attn="sdpa"),
    "unified_centroid": dict(unified=True, ordered=True, seed=4, attn="eager"),
}


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    """name -> (reference torch model, folder written by save_pretrained)."""
    out = {}
    for name, case in CASES.items():
        ref = build_reference(**case)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        if name == "unified":
            # the Google upload's spelling: global_head_dim instead of per_layer_config
            cfg = json.loads((folder / "config.json").read_text())
            cfg["text_config"].pop("per_layer_config")
            cfg["text_config"]["global_head_dim"] = GLOBAL_HEAD_DIM
            (folder / "config.json").write_text(json.dumps(cfg))
        out[name] = (ref, folder)
    return out


@pytest.fixture(scope="module")
def loaded(drafters):
    return {name: load_drafter(folder)[0] for name, (_, folder) in drafters.items()}


def random_inputs(seed, batch, t_full, t_sliding, q_len=1):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(
        emb=f32(batch, q_len, BACKBONE) * math.sqrt(BACKBONE) * 0.05,
        hidden=f32(batch, q_len, BACKBONE),
        kv={
            "full_attention": (f32(batch, 1, t_full, GLOBAL_HEAD_DIM), f32(batch, 1, t_full, GLOBAL_HEAD_DIM)),
            "sliding_attention": (f32(batch, 1, t_sliding, HEAD_DIM), f32(batch, 1, t_sliding, HEAD_DIM)),
        },
    )


def run_reference(ref, emb, hidden, kv, positions, attention_mask=None):
    t = torch.from_numpy
    with torch.no_grad():
        out = ref(
            inputs_embeds=torch.cat([t(emb), t(hidden)], dim=-1),
            position_ids=t(np.asarray(positions, dtype=np.int64)),
            shared_kv_states={k: (t(a), t(b)) for k, (a, b) in kv.items()},
            attention_mask=None if attention_mask is None else t(attention_mask),
            use_cache=False,
        )
    return out.last_hidden_state.numpy(), out.logits.numpy()


def run_mlx(model, emb, hidden, kv, position, attention_mask=None):
    kv = {k: (mx.array(a), mx.array(b)) for k, (a, b) in kv.items()}
    mask = None if attention_mask is None else mx.array(attention_mask)
    h, projected = model(mx.array(emb), mx.array(hidden), kv, position, attention_mask=mask)
    return np.array(projected), np.array(model.logits(h)), np.array(model.greedy_token(h))


def assert_close(ours, ref, tol=1e-4):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max abs error {err:.3g} (scale {scale:.3g})"


# --- config ---------------------------------------------------------------------------------


def test_config_spellings_agree(drafters):
    new = json.loads((drafters["dense"][1] / "config.json").read_text())
    assert "per_layer_config" in new["text_config"]
    old = json.loads(json.dumps(new))
    old["text_config"].pop("per_layer_config")
    old["text_config"].update(global_head_dim=GLOBAL_HEAD_DIM, num_global_key_value_heads=2)
    a, b = DrafterArgs.from_dict(new), DrafterArgs.from_dict(old)
    assert a.text.global_head_dim == b.text.global_head_dim == GLOBAL_HEAD_DIM
    assert a.text.head_dim == HEAD_DIM and a.vocab_size == VOCAB and a.sliding_window == WINDOW
    assert a.text.num_kv_shared_layers == 4 and a.text.final_logit_softcapping is None
    new["text_config"]["per_layer_config"]["3"]["num_key_value_heads"] = 2
    assert DrafterArgs.from_dict(new).text.num_global_key_value_heads == 2
    unified = json.loads((drafters["unified_centroid"][1] / "config.json").read_text())
    u = DrafterArgs.from_dict(unified)
    assert u.model_type == "gemma4_unified_assistant" and u.use_ordered_embeddings and u.num_centroids == 32
    with pytest.raises(MTPError, match="unsupported drafter model type 'gemma4'"):
        DrafterArgs.from_dict({**new, "model_type": "gemma4"})
    bad = json.loads(json.dumps(new))
    bad["text_config"]["per_layer_config"]["3"]["rope_theta"] = 1.0
    with pytest.raises(MTPError, match="per_layer_config"):
        DrafterArgs.from_dict(bad)


def assistant_config(**text_changes) -> dict:
    text = {**text_config(False), **text_changes}
    return {"model_type": "gemma4_assistant", "backbone_hidden_size": BACKBONE, "text_config": text}


@pytest.mark.parametrize("shared", ["missing", None, 0, 4])
def test_num_kv_shared_layers_default_is_transformers(shared):
    # Gemma4AssistantConfig turns an unset or 0 count into "every layer is shared"
    changes = {} if shared == "missing" else {"num_kv_shared_layers": shared}
    config = assistant_config(**changes)
    if shared == "missing":
        config["text_config"].pop("num_kv_shared_layers", None)
    if shared is not None:  # transformers refuses null outright; we read it as unset
        reference = Gemma4AssistantConfig(**json.loads(json.dumps(config)))
        assert reference.text_config.num_kv_shared_layers == 4
    assert normalize_draft_config(config)["text_config"]["num_kv_shared_layers"] == 4
    assert DrafterArgs.from_dict(config).text.num_kv_shared_layers == 4


def test_partly_shared_drafter_is_refused():
    with pytest.raises(MTPError, match="every layer must be KV-shared, got 2 of 4"):
        DrafterArgs.from_dict(assistant_config(num_kv_shared_layers=2))


def test_bidirectional_drafter_is_refused():
    # so DrafterArgs never needs transformers' halved window for use_bidirectional_attention='all'
    with pytest.raises(MTPError, match="bidirectional"):
        DrafterArgs.from_dict(assistant_config(use_bidirectional_attention="all"))


def test_drafter_args_are_built_from_the_normalized_config():
    raw = assistant_config(per_layer_config={"3": {"head_dim": GLOBAL_HEAD_DIM}})
    raw["text_config"].pop("hidden_size_per_layer_input")  # an assistant's means 0 when left out
    normalized = normalize_draft_config(raw)
    args = DrafterArgs.from_dict(raw)
    assert args.text_config == normalized["text_config"]
    assert DrafterArgs.from_dict(normalized) == args  # normalizing twice changes nothing
    assert args.sliding_window == normalized["text_config"]["sliding_window"] == WINDOW
    assert args.text.global_head_dim == GLOBAL_HEAD_DIM and args.text.hidden_size_per_layer_input == 0
    assert args.vocab_size == VOCAB and not args.use_ordered_embeddings and args.num_centroids == 2048


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gemma4_assistant", "backbone_hidden_size": BACKBONE}, "text_config"),
    ({"model_type": "gemma4_assistant", "text_config": text_config(False)}, "backbone_hidden_size"),
    ({**assistant_config(), "use_ordered_embeddings": True, "num_centroids": 30}, "do not fit together"),
    (assistant_config(layer_types=["sliding_attention"] * 3 + ["chunked_attention"]), "layer_types"),
    (assistant_config(hidden_size_per_layer_input=16), "per-layer inputs"),
])
def test_bad_drafter_configs(config, message):
    with pytest.raises(MTPError, match=message):
        DrafterArgs.from_dict(config)


def test_parameter_names_are_hf_names(drafters, loaded):
    from mlx.utils import tree_flatten

    for name, (ref, _) in drafters.items():
        ours = {k: tuple(v.shape) for k, v in tree_flatten(loaded[name].parameters())}
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
        assert ours == theirs


# --- masks ----------------------------------------------------------------------------------


def reference_masks(ref, q_len, t_full, t_sliding, attention_mask):
    inp = random_inputs(0, attention_mask.shape[0] if attention_mask is not None else 2, t_full, t_sliding, q_len)
    kv = {k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in inp["kv"].items()}
    emb = torch.zeros(kv["full_attention"][0].shape[0], q_len, HIDDEN)
    am = None if attention_mask is None else torch.from_numpy(attention_mask)
    masks = ref.create_attention_masks(emb, am, kv)
    out = {}
    for kind, m in masks.items():
        t = t_full if kind == "full_attention" else t_sliding
        if m is None:
            out[kind] = np.ones((emb.shape[0], 1, q_len, t), bool)
        else:
            m = m.numpy()
            out[kind] = np.broadcast_to(m if m.dtype == bool else m == 0, (emb.shape[0], 1, q_len, t))
    return out


@pytest.mark.parametrize("q_len,t_full,t_sliding", [(1, 5, 5), (1, 17, 17), (1, 40, 40), (1, 40, 25), (3, 40, 40)])
@pytest.mark.parametrize("padded", [False, True])
def test_masks_match_reference(drafters, loaded, q_len, t_full, t_sliding, padded):
    ref, model = drafters["dense"][0], loaded["dense"]
    am = None
    if padded:
        am = np.ones((2, t_full), np.int64)
        am[1, : t_full - 3] = 0  # left padding that reaches into the sliding window
    want = reference_masks(ref, q_len, t_full, t_sliding, am)
    kv = random_inputs(0, 2, t_full, t_sliding, q_len)["kv"]
    kv = {k: (mx.array(a), mx.array(b)) for k, (a, b) in kv.items()}
    got_kv, got = model._visible(kv, q_len, None if am is None else mx.array(am))
    for kind in ("full_attention", "sliding_attention"):
        t_given = kv[kind][0].shape[2]
        t_seen = got_kv[kind][0].shape[2]  # a single query gets a sliced tail instead of a mask
        m = got[kind]
        m = np.ones((2, 1, q_len, t_seen), bool) if m is None else np.broadcast_to(np.array(m), (2, 1, q_len, t_seen))
        full = np.zeros((2, 1, q_len, t_given), bool)
        full[..., t_given - t_seen :] = m
        np.testing.assert_array_equal(full, want[kind], err_msg=kind)


def test_sliding_window_sees_last_window_plus_one():
    m = np.array(sliding_mask(1, 40, WINDOW))[0]
    assert m.sum() == WINDOW + 1 and m[-(WINDOW + 1) :].all()


# --- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("t_full,t_sliding", [(6, 6), (40, 40), (40, 20)])
def test_forward_matches_reference(drafters, loaded, name, t_full, t_sliding):
    ref, model = drafters[name][0], loaded[name]
    inp = random_inputs(11, 2, t_full, t_sliding)
    positions = [t_full - 1, t_full - 3]  # per-row query positions
    ref_proj, ref_logits = run_reference(ref, inp["emb"], inp["hidden"], inp["kv"], [[p] for p in positions])
    proj, logits, tok = run_mlx(model, inp["emb"], inp["hidden"], inp["kv"], mx.array(positions))
    assert_close(proj, ref_proj)
    assert_close(logits, ref_logits)
    np.testing.assert_array_equal(tok, ref_logits.argmax(-1))


@pytest.mark.parametrize("name", ["dense", "unified_centroid"])
def test_padding_mask_matches_reference(drafters, loaded, name):
    ref, model = drafters[name][0], loaded[name]
    inp = random_inputs(12, 2, 40, 40)
    am = np.ones((2, 40), np.int64)
    am[1, :30] = 0
    ref_proj, ref_logits = run_reference(ref, inp["emb"], inp["hidden"], inp["kv"], [[39], [39]], am)
    proj, logits, tok = run_mlx(model, inp["emb"], inp["hidden"], inp["kv"], 39, am)
    assert_close(proj, ref_proj)
    assert_close(logits, ref_logits)
    np.testing.assert_array_equal(tok, ref_logits.argmax(-1))


def test_two_queries_match_reference(drafters, loaded):
    # eager only: with sdpa and no padding the reference's full-attention layers pass
    # is_causal=True for q_len > 1, a top-left causal mask over the shared K/V (a reference bug)
    ref, model = drafters["unified_centroid"][0], loaded["unified_centroid"]
    inp = random_inputs(13, 2, 40, 40, q_len=2)
    ref_proj, ref_logits = run_reference(ref, inp["emb"], inp["hidden"], inp["kv"], [[38, 39], [38, 39]])
    proj, logits, tok = run_mlx(model, inp["emb"], inp["hidden"], inp["kv"], 38)
    assert_close(proj, ref_proj)
    assert_close(logits, ref_logits)
    np.testing.assert_array_equal(tok, ref_logits.argmax(-1))


def draft_reference(ref, table, token, hidden, kv, position, steps):
    """SinglePositionMultiTokenCandidateGenerator.get_candidates' drafter loop."""
    embed = torch.from_numpy(table) * math.sqrt(BACKBONE)
    token, hidden = torch.from_numpy(token), torch.from_numpy(hidden)
    kv = {k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in kv.items()}
    position_ids = torch.full((token.shape[0], 1), position, dtype=torch.long)
    drafted = []
    with torch.no_grad():
        for _ in range(steps):
            out = ref(
                inputs_embeds=torch.cat([embed[token], hidden], dim=-1),
                attention_mask=None,
                position_ids=position_ids,
                shared_kv_states=kv,
                use_cache=False,
            )
            token, hidden = out.logits.argmax(dim=-1), out.last_hidden_state
            drafted.append(token)
    return torch.cat(drafted, dim=1).numpy()


def draft_mlx(model, table, token, hidden, kv, position, steps):
    embed = mx.array(table) * math.sqrt(BACKBONE)
    token, hidden = mx.array(token), mx.array(hidden)
    kv = {k: (mx.array(a), mx.array(b)) for k, (a, b) in kv.items()}
    drafted = []
    for _ in range(steps):
        h, hidden = model(embed[token], hidden, kv, position)
        token = model.greedy_token(h)
        drafted.append(token)
    return np.array(mx.concatenate(drafted, axis=1))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("t", [9, 45])
def test_multi_step_draft_matches_reference(drafters, loaded, name, t):
    ref, model = drafters[name][0], loaded[name]
    rng = np.random.default_rng(21)
    table = rng.standard_normal((VOCAB, BACKBONE)).astype(np.float32) * 0.05
    token = rng.integers(0, VOCAB, (2, 1))
    inp = random_inputs(22, 2, t, t)
    want = draft_reference(ref, table, token, inp["hidden"], inp["kv"], t - 1, 4)
    got = draft_mlx(model, table, token, inp["hidden"], inp["kv"], t - 1, 4)
    np.testing.assert_array_equal(got, want)


def test_greedy_ties_go_to_lowest_canonical_id(loaded):
    nonzero = False
    for name in ("dense", "centroid"):
        model = loaded[name]
        saved = model.model.embed_tokens.weight
        try:
            # every token row equal: all candidate logits tie exactly
            model.model.embed_tokens.weight = mx.broadcast_to(saved[7], saved.shape)
            for seed in (31, 32, 33):
                inp = random_inputs(seed, 2, 10, 10)
                _, logits, tok = run_mlx(model, inp["emb"], inp["hidden"], inp["kv"], 9)
                np.testing.assert_array_equal(tok, logits.argmax(-1))  # numpy/torch: first maximum
                if name == "centroid":
                    h, _ = model(mx.array(inp["emb"]), mx.array(inp["hidden"]),
                                 {k: (mx.array(a), mx.array(b)) for k, (a, b) in inp["kv"].items()}, 9)
                    ids, _ = model._selected(h)
                    np.testing.assert_array_equal(tok, np.array(ids).min(-1))
                    nonzero |= bool((tok > 0).any())
        finally:
            model.model.embed_tokens.weight = saved
    assert nonzero  # the winner is the smallest *selected* id, not simply 0


# --- loading --------------------------------------------------------------------------------


def copy_with(folder, dest, edit):
    dest.mkdir()
    shutil.copy(folder / "config.json", dest / "config.json")
    weights = mx.load(str(folder / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    return dest


def test_load_rejects_bad_weights(drafters, tmp_path):
    folder = drafters["centroid"][1]

    def missing(w):
        del w["model.layers.2.mlp.up_proj.weight"]

    def extra(w):
        w["model.layers.0.self_attn.q_proj.bias"] = mx.zeros((HIDDEN,))

    def wrong(w):
        w["pre_projection.weight"] = w["pre_projection.weight"].T

    for kind, edit, key in (
        ("missing", missing, "model.layers.2.mlp.up_proj.weight"),
        ("unexpected", extra, "model.layers.0.self_attn.q_proj.bias"),
        ("wrong shape", wrong, "pre_projection.weight"),
    ):
        bad = copy_with(folder, tmp_path / kind.replace(" ", "_"), edit)
        with pytest.raises(MTPError, match=kind) as err:
            load_drafter(bad)
        assert key in str(err.value)
    with pytest.raises(MTPError, match="config.json"):
        load_drafter(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_load_rejects_damaged_safetensors(drafters, tmp_path, damage):
    dest = shutil.copytree(drafters["centroid"][1], tmp_path / "d")
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    with pytest.raises(MTPError, match="corrupt") as err:
        load_drafter(dest)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_token_ordering_int32_and_int64_and_tied_extras(drafters, tmp_path):
    folder = drafters["centroid"][1]
    assert mx.load(str(folder / "model.safetensors"))["masked_embedding.token_ordering"].dtype == mx.int64

    def to_int32_with_extras(w):
        w["masked_embedding.token_ordering"] = w["masked_embedding.token_ordering"].astype(mx.int32)
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
        w["model.layers.0.self_attn.k_proj.weight"] = mx.zeros((HEAD_DIM, HIDDEN))  # unused by shared layers
        w["model.rotary_emb.sliding_attention_inv_freq"] = mx.zeros((HEAD_DIM // 2,))

    a, _ = load_drafter(folder)
    b, _ = load_drafter(copy_with(folder, tmp_path / "i32", to_int32_with_extras))
    assert a.masked_embedding.token_ordering.dtype == b.masked_embedding.token_ordering.dtype == mx.int32
    inp = random_inputs(41, 2, 30, 30)
    np.testing.assert_array_equal(run_mlx(a, **_args(inp, 29))[2], run_mlx(b, **_args(inp, 29))[2])

    def not_permutation(w):
        w["masked_embedding.token_ordering"] = mx.zeros((VOCAB,), mx.int64)

    with pytest.raises(MTPError, match="permutation"):
        load_drafter(copy_with(folder, tmp_path / "perm", not_permutation))


def _args(inp, position):
    return dict(emb=inp["emb"], hidden=inp["hidden"], kv=inp["kv"], position=position)


def test_save_drafter_roundtrip(loaded, drafters, tmp_path):
    model = loaded["unified_centroid"]
    config = json.loads((drafters["unified_centroid"][1] / "config.json").read_text())
    save_drafter(model, config, tmp_path / "out")
    again, cfg = load_drafter(tmp_path / "out")
    assert "quantization" not in cfg
    inp = random_inputs(51, 2, 30, 30)
    for x, y in zip(run_mlx(model, **_args(inp, 29)), run_mlx(again, **_args(inp, 29))):
        np.testing.assert_array_equal(x, y)


# --- quantized and bfloat16 -----------------------------------------------------------------


def write_quantized(folder, dest, group_size=64, bits=4):
    """An mlx-community style folder: quantized matrices except the centroid router, one 8-bit override."""
    weights = mx.load(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    override = "model.layers.1.mlp.down_proj"
    out, dequantized = {}, {}
    for k, w in weights.items():
        module = k.removesuffix(".weight")
        if w.ndim == 2 and k.endswith(".weight") and "centroids" not in k:
            b = 8 if module == override else bits
            q, s, z = mx.quantize(w, group_size=group_size, bits=b)
            out.update({k: q, f"{module}.scales": s, f"{module}.biases": z})
            dequantized[k] = mx.dequantize(q, s, z, group_size=group_size, bits=b)
        else:
            out[k] = dequantized[k] = w
    config["quantization"] = {"group_size": group_size, "bits": bits, override: {"group_size": group_size, "bits": 8}}
    dest.mkdir()
    mx.save_safetensors(str(dest / "model.safetensors"), out)
    (dest / "config.json").write_text(json.dumps(config))
    deq = dest.parent / (dest.name + "_dequantized")
    deq.mkdir()
    mx.save_safetensors(str(deq / "model.safetensors"), dequantized)
    shutil.copy(folder / "config.json", deq / "config.json")
    return dest, deq


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["dense", "centroid"])
def test_quantized_folder(drafters, loaded, tmp_path, name, bits):
    folder = drafters[name][1]
    qdir, deqdir = write_quantized(folder, tmp_path / "q", bits=bits)
    qmodel, _ = load_drafter(qdir)
    deq, _ = load_drafter(deqdir)
    assert isinstance(qmodel.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(qmodel.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert qmodel.model.layers[1].mlp.down_proj.bits == 8 and qmodel.model.layers[0].mlp.down_proj.bits == bits
    if name == "centroid":
        assert type(qmodel.masked_embedding.centroids) is nn.Linear  # no .scales -> stays float

    rng = np.random.default_rng(61)
    table = rng.standard_normal((VOCAB, BACKBONE)).astype(np.float32) * 0.05
    token = rng.integers(0, VOCAB, (2, 1))
    inp = random_inputs(62, 2, 40, 40)
    # the quantized kernels (quantized_matmul, QuantizedEmbedding gather, as_linear) compute
    # the same function as the float drafter holding the dequantized weights
    q_out, d_out = run_mlx(qmodel, **_args(inp, 39)), run_mlx(deq, **_args(inp, 39))
    assert_close(q_out[0], d_out[0], 1e-4)
    assert_close(q_out[1], d_out[1], 1e-4)
    np.testing.assert_array_equal(q_out[2], d_out[2])
    np.testing.assert_array_equal(q_out[2], q_out[1].argmax(-1))
    np.testing.assert_array_equal(
        draft_mlx(qmodel, table, token, inp["hidden"], inp["kv"], 39, 4),
        draft_mlx(deq, table, token, inp["hidden"], inp["kv"], 39, 4),
    )
    # closeness to the unquantized drafter: random miniatures amplify the ~9% weight error of
    # 4-bit a lot (projected hidden off by 40-100%), so the bound is only tight at 8 bits
    f_out = run_mlx(loaded[name], **_args(inp, 39))
    rel = np.linalg.norm(q_out[0] - f_out[0]) / np.linalg.norm(f_out[0])
    assert rel < (0.25 if bits == 8 else 1.2), rel
    if bits == 8 and name == "dense":
        assert np.corrcoef(q_out[1].ravel(), f_out[1].ravel())[0, 1] > 0.99
        np.testing.assert_array_equal(q_out[2], f_out[2])

    # save_drafter writes the quantization it finds, overrides included
    save_drafter(qmodel, json.loads((qdir / "config.json").read_text()), tmp_path / "resaved")
    again, cfg = load_drafter(tmp_path / "resaved")
    q = cfg["quantization"]
    assert q["bits"] == bits and q.get("model.layers.1.mlp.down_proj", q)["bits"] == 8
    assert q.get("masked_embedding.centroids") is None  # unquantized modules are simply absent
    np.testing.assert_array_equal(run_mlx(again, **_args(inp, 39))[1], q_out[1])


@pytest.mark.parametrize("name", ["dense", "unified_centroid"])
def test_bfloat16(drafters, tmp_path, name):
    folder = drafters[name][1]
    f32, _ = load_drafter(folder)
    bf16, _ = load_drafter(folder)
    bf16.set_dtype(mx.bfloat16)
    if name == "unified_centroid":
        assert bf16.masked_embedding.token_ordering.dtype == mx.int32
    inp = random_inputs(71, 2, 40, 40)
    kv = {k: (mx.array(a, mx.bfloat16), mx.array(b, mx.bfloat16)) for k, (a, b) in inp["kv"].items()}
    h, proj = bf16(mx.array(inp["emb"], mx.bfloat16), mx.array(inp["hidden"], mx.bfloat16), kv, 39)
    logits, tok = bf16.logits(h), bf16.greedy_token(h)
    assert proj.dtype == logits.dtype == mx.bfloat16 and tok.dtype == mx.int32
    np.testing.assert_array_equal(np.array(tok), np.array(logits.astype(mx.float32)).argmax(-1))
    ref = run_mlx(f32, **_args(inp, 39))
    rel = np.linalg.norm(np.array(proj.astype(mx.float32)) - ref[0]) / np.linalg.norm(ref[0])
    assert rel < 0.05, rel

    # and a quantized embedding with bfloat16 scales
    qdir, _ = write_quantized(folder, tmp_path / "q")
    q, _ = load_drafter(qdir)
    q.set_dtype(mx.bfloat16)
    h, _ = q(mx.array(inp["emb"], mx.bfloat16), mx.array(inp["hidden"], mx.bfloat16), kv, 39)
    np.testing.assert_array_equal(np.array(q.greedy_token(h)), np.array(q.logits(h).astype(mx.float32)).argmax(-1))
