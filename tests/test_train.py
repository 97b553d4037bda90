"""Drafter training: the loss falls, drafts go through the inference forward, and what
`train-drafter` writes loads in transformers' assistant and drafts the same tokens there."""

import json

import mlx.core as mx
import numpy as np
import pytest

import reference_models as ref
from mlx_gemma_mtp import api
from mlx_gemma_mtp.train import distill as t
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.runtime.cache import reserve
from mlx_gemma_mtp.runtime.pair import Stats
from mlx_gemma_mtp.errors import MTPError
from test_generate import prompt_ids, reference_drafts, run

CFG = t.TrainConfig(steps=30, lr=3e-3, block=3, batch=4, seq_len=40, seed=0, warmup=3, eval_every=10, eval_windows=4)


@pytest.fixture(scope="session")
def target_only(reference_pair, tmp_path_factory):
    """target_only(variant) -> (converted float32 target folder, its HF folder, its HF drafter folder)."""
    cache = {}

    def make(variant):
        if variant not in cache:
            target, draft = reference_pair(variant)
            out = tmp_path_factory.mktemp("train") / variant
            convert(str(target), out, dtype="float32", progress=False)
            cache[variant] = (out, target, draft)
        return cache[variant]

    return make


def random_streams(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(3, ref.VOCAB, size=3000).astype(np.int32), rng.integers(3, ref.VOCAB, size=400).astype(np.int32)


def trained(target_only, variant, init: bool, steps=CFG.steps):
    target_dir, _, hf_draft = target_only(variant)
    pair, _ = api.load(str(target_dir))
    config = json.loads((target_dir / "target" / "config.json").read_text())
    if init:
        drafter, draft_config = t.init_drafter(str(hf_draft))
    else:
        drafter, draft_config = t.new_drafter(config, pair.view, 2, 64, 128, seed=0)
    train_stream, held_stream = random_streams()
    cfg = t.TrainConfig(**{**vars(CFG), "steps": steps})
    history = t.train(drafter, pair.view, train_stream, held_stream, cfg)
    return pair, drafter, draft_config, history


@pytest.mark.parametrize("variant,init", [("31b", False), ("e2b", True)])
def test_training_lowers_the_loss(target_only, variant, init):
    _, drafter, _, history = trained(target_only, variant, init)
    losses = history["loss"]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (first, last)
    assert len(history["acceptance"]) == 1 + CFG.steps // CFG.eval_every


def test_centroid_head_stays_frozen_when_re_aligning(target_only):
    _, hf_draft_dir = target_only("e2b")[1:]
    before, _ = t.init_drafter(str(hf_draft_dir))
    _, after, _, _ = trained(target_only, "e2b", init=True, steps=5)
    assert mx.array_equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight).item()
    assert mx.array_equal(before.masked_embedding.centroids.weight, after.masked_embedding.centroids.weight).item()
    assert not mx.array_equal(before.pre_projection.weight, after.pre_projection.weight).item()


def test_training_blocks_are_the_inference_forward(target_only):
    """Position t of an unrolled training block drafts what a round at t drafts."""
    target_dir, _, _ = target_only("31b")
    pair, _ = api.load(str(target_dir))
    config = json.loads((target_dir / "target" / "config.json").read_text())
    drafter, _ = t.new_drafter(config, pair.view, 2, 64, 128, seed=1)
    window = pair.view.args.sliding_window
    tokens = mx.array([[2] + np.random.default_rng(3).integers(110, ref.VOCAB, size=window + 30).tolist()])
    features = t.target_features(pair.view, tokens)
    hs = t.unrolled_blocks(drafter, features, block=3)
    drafted = [drafter.greedy_token(h)[0] for h in hs]
    mx.eval(drafted)
    for pos in (2, window - 1, window + 1, window + 20):
        # inference: prefix tokens[..pos], bonus tokens[pos + 1], then the drafter's own tokens
        cache = pair.view.make_cache()
        reserve(cache, pos + 1)
        hidden = pair.view.hidden(tokens[:, : pos + 1], cache)[:, -1:]
        kv, masks = pair.view.shared_kv(cache, drafter.args.sliding_window + 1)
        token, state = tokens[:, pos + 1 : pos + 2], hidden
        at = mx.array([pos + 1])
        h, state = drafter.step(pair.view.embed(token), state, kv, masks, at)
        assert drafter.greedy_token(h).item() == drafted[0][pos].item()
        # step 2 with the text's token as input, as training feeds it
        h, _ = drafter.step(pair.view.embed(tokens[:, pos + 2 : pos + 3]), state, kv, masks, at)
        assert drafter.greedy_token(h).item() == drafted[1][pos].item()


@pytest.mark.parametrize("variant,init", [("31b", False), ("12b", False), ("e2b", True)])
def test_trained_drafter_loads_in_transformers_and_drafts_the_same(target_only, variant, init, tmp_path):
    _, drafter, draft_config, _ = trained(target_only, variant, init, steps=10)
    out = tmp_path / "drafter"
    t.write_drafter(drafter, draft_config, out, force=False)
    target_dir, hf_target_dir, _ = target_only(variant)
    hf_target = ref.load_reference_target(hf_target_dir)
    hf_drafter, info = ref.load_reference_drafter(out, return_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(".k_proj." in k or ".v_proj." in k or ".k_norm." in k for k in info["missing_keys"]), info

    pair, _ = api.load(str(target_dir), draft_path=str(out))
    prompt = prompt_ids(pair.view.args.sliding_window, long=True)
    stats = Stats()
    tokens = run(pair, prompt, 12, 3, stats=stats)
    sequence, emitted, position = list(prompt), [tokens[0]], 1
    for drafts, accepted in stats.round_log:
        assert drafts == reference_drafts(hf_target, hf_drafter, sequence + emitted[:-1], emitted[-1], len(drafts))
        emitted += tokens[position : position + accepted + 1]
        position += accepted + 1
    assert len(stats.round_log) >= 3


def test_write_drafter_refuses_existing_output(target_only, tmp_path):
    target_dir, _, hf_draft = target_only("31b")
    drafter, config = t.init_drafter(str(hf_draft))
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MTPError, match="already exists"):
        t.write_drafter(drafter, config, out, force=False)
    assert (out / "keep.txt").read_text() == "mine"
    t.write_drafter(drafter, config, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_too_little_text_is_a_clear_error():
    with pytest.raises(MTPError, match="not enough training text"):
        t.split_stream(np.zeros(100, np.int32), CFG)


def test_quantized_target_features_survive_dequantizing_for_cpu_training(reference_pair, tmp_path):
    """train-drafter dequantizes a quantized target on the CPU: the features it trains on stay the
    quantized target's own (same values, float rounding apart)."""
    from mlx_gemma_mtp.convert import QuantSpec

    target, _ = reference_pair("31b")
    out = tmp_path / "q4"
    convert(str(target), out, quantization=QuantSpec(4, 64, "affine"), dtype="float32", progress=False)
    pair, _ = api.load(str(out))
    tokens = mx.array([[2] + np.random.default_rng(0).integers(3, ref.VOCAB, size=60).tolist()])
    quantized = t.target_features(pair.view, tokens)
    mx.eval(quantized)
    assert t.dequantize_on_cpu(pair.target) == (mx.default_device() == mx.cpu)
    dequantized = t.target_features(pair.view, tokens)
    for key in ("hidden", "log_p"):
        assert mx.allclose(quantized[key], dequantized[key], atol=1e-4).item()
    assert not t.dequantize_on_cpu(pair.target)  # nothing quantized is left


def test_empty_per_layer_config_means_full_layers_use_head_dim():
    """transformers 5.22 lists only the overrides that differ; the demo target (head_dim 64 everywhere)
    was written with `per_layer_config: {}`, which once read as global_head_dim 512."""
    from mlx_gemma_mtp.model.config import attention_shapes, normalize_text_config

    text = normalize_text_config(
        {"head_dim": 64, "num_key_value_heads": 2, "num_hidden_layers": 3, "per_layer_config": {}},
        unified=False, role="target",
    )
    assert text["global_head_dim"] == 64
    assert attention_shapes(text)["full_attention"] == (64, 2)
    legacy = normalize_text_config({"head_dim": 64, "num_hidden_layers": 3}, unified=False, role="target")
    assert legacy["global_head_dim"] == 512  # without per_layer_config, transformers' default stands
