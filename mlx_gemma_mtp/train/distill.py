"""Drafter training by self-distillation (`gemma-mtp train-drafter`).

The target runs over text; the drafter learns to predict the target's own next-token
distributions K positions ahead, through the forward it uses at inference (`Drafter.step`).
For a window of L tokens every position t is one draft block at once:

    step 1:  input (embed(x[t+1]), target hidden h[t])    -> label: target's p(. | x[..t+1])
    step j:  input (embed(x[t+j]), drafter's state j - 1) -> label: target's p(. | x[..t+j])

Each block's queries sit at position t + 1 and see the target's shared K/V up to t (the sliding
layers the last window + 1 entries of it), exactly as a round sees its accepted prefix. The
inputs are the text's tokens: where they differ from what the target would have emitted, the
round would have stopped there, so only the matching case matters for acceptance.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma_mtp.model.checkpoint import DTYPE_NAMES, cast_floats, output_folder, with_dtype
from mlx_gemma_mtp.model.config import normalize_target_config, text_config_of
from mlx_gemma_mtp.model.drafter import Drafter, DrafterArgs, load_drafter
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.model.target import TargetView

ARCHITECTURES = {
    "gemma4_assistant": "Gemma4AssistantForCausalLM",
    "gemma4_unified_assistant": "Gemma4UnifiedAssistantForCausalLM",
}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".html", ".csv"}


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    block: int = 4  # K: draft steps unrolled per block
    batch: int = 8
    seq_len: int = 256
    seed: int = 0
    warmup: int = 50
    held_out_fraction: float = 0.05
    eval_every: int = 50
    eval_windows: int = 16


# --- data ----------------------------------------------------------------------------------


def data_files(paths: list) -> list[Path]:
    """The files named, and the text files under the folders named, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise MTPError(f"training data '{p}' does not exist")
    if not files:
        raise MTPError(f"no text files in {', '.join(map(str, paths))}")
    return files


def token_stream(files: list[Path], tokenizer) -> np.ndarray:
    """Every file as one document: bos + text + eos, concatenated."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    ids = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        ids += ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)
        ids += [eos] if eos is not None else []
    return np.array(ids, dtype=np.int32)


def split_stream(stream: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training part, held-out tail): the last held_out_fraction of the tokens, at least
    eval_windows windows, is never trained on."""
    need = (cfg.eval_windows + 2) * cfg.seq_len
    held = max(int(stream.size * cfg.held_out_fraction), cfg.eval_windows * cfg.seq_len)
    if stream.size < need + held:
        raise MTPError(
            f"not enough training text: {stream.size} tokens, need at least {need + held} "
            f"for --seq-len {cfg.seq_len} (or use a shorter --seq-len)"
        )
    return stream[:-held], stream[-held:]


# --- the target's side ------------------------------------------------------------------------


def target_features(view: TargetView, tokens: mx.array) -> dict:
    """One target forward over tokens [B, L]: final-norm hidden states, log-probabilities of the
    next token at every position, and the producers' K/V at every position (no gradients)."""
    cache = view.whole_cache()
    hidden = view.hidden(tokens, cache)
    logits = view.logits(hidden).astype(mx.float32)
    full, sliding = (cache[view.producers[kind]] for kind in ("full_attention", "sliding_attention"))
    features = {
        "embeds": view.embed(tokens),
        "hidden": hidden,
        "log_p": logits - mx.logsumexp(logits, axis=-1, keepdims=True),
        "kv": {
            "full_attention": (full.keys[..., : full.offset, :], full.values[..., : full.offset, :]),
            "sliding_attention": (sliding.keys[..., : sliding.offset, :], sliding.values[..., : sliding.offset, :]),
        },
    }
    return features  # computed outside value_and_grad: no gradients reach the target


def dequantize_on_cpu(model: nn.Module) -> bool:
    """On the CPU backend, replace quantized layers by float ones holding the dequantized values
    (MLX's CPU quantized matmuls are far slower than float ones; the values are the same). Returns
    whether it did."""
    from mlx_lm.utils import dequantize_model

    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if not quantized or mx.default_device() != mx.cpu:
        return False
    dequantize_model(model)
    return True


# --- the drafter's side ---------------------------------------------------------------------


def block_masks(queries: int, window: int) -> dict:
    """Query t (at position t + 1) sees shared entries j <= t; sliding layers only t - window..t."""
    t = mx.arange(queries)[:, None]
    j = mx.arange(queries)[None, :]
    seen = j <= t
    return {"full_attention": seen[None, None], "sliding_attention": (seen & (j >= t - window))[None, None]}


def unrolled_blocks(drafter: Drafter, features: dict, block: int) -> list:
    """The drafter's normed outputs h [B, L - block, D] for steps 1..block, every position at once."""
    queries = features["hidden"].shape[1] - block
    kv = {kind: (k[..., :queries, :], v[..., :queries, :]) for kind, (k, v) in features["kv"].items()}
    masks = block_masks(queries, drafter.args.sliding_window)
    state, outputs = features["hidden"][:, :queries], []
    for j in range(1, block + 1):
        h, state = drafter.step(features["embeds"][:, j : j + queries], state, kv, masks, 1)
        outputs.append(h)
    return outputs


def dense_log_q(drafter: Drafter, h: mx.array) -> mx.array:
    """Full-vocabulary log-probabilities of the drafter's head. A centroid head's selected
    logits are these same dot products, so training them trains what it selects among."""
    logits = drafter.model.embed_tokens.as_linear(h).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def distill_loss(drafter: Drafter, features: dict, block: int) -> mx.array:
    """Mean over the block's steps of KL(target || drafter) at the position each step predicts."""
    queries = features["hidden"].shape[1] - block
    losses = []
    for j, h in enumerate(unrolled_blocks(drafter, features, block), start=1):
        log_p = features["log_p"][:, j : j + queries]
        log_q = dense_log_q(drafter, h)
        losses.append((mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    return mx.stack(losses).mean()


def greedy_acceptance(drafter: Drafter, features: dict, tokens: mx.array, block: int) -> tuple[list, list]:
    """Conditional greedy acceptance per draft position, counted where inference would be in
    the same state: the text's next tokens are what the target would have emitted and the
    earlier drafts were accepted. Returns (accepted, drafted) counts per position."""
    queries = features["hidden"].shape[1] - block
    target_choice = mx.argmax(features["log_p"], axis=-1)  # [B, L]
    follows = tokens[:, 1:] == target_choice[:, :-1]  # the text is the target's greedy choice
    hs = unrolled_blocks(drafter, features, block)
    drafts = [drafter.greedy_token(h) for h in hs]
    matches = [drafts[j - 1] == target_choice[:, j : j + queries] for j in range(1, block + 1)]
    mx.eval(follows, matches)
    follows, matches = np.array(follows), [np.array(m) for m in matches]
    accepted, drafted = [], []
    alive = np.ones_like(matches[0])
    for j in range(block):
        alive = alive & follows[:, j : j + queries]  # input token of step j + 1 is the target's
        drafted.append(int(alive.sum()))
        alive = alive & matches[j]
        accepted.append(int(alive.sum()))
    return accepted, drafted


# --- building and saving drafters -----------------------------------------------------------


def new_drafter_config(target_config: dict, layers: int, hidden: int, intermediate: int) -> dict:
    """A gemma4_assistant config for the target's family: K/V shapes, window and RoPE from the
    target, Google's layer pattern (sliding layers, then one full)."""
    text = text_config_of(normalize_target_config(target_config))
    if target_config["model_type"] == "gemma4_unified":
        model_type = "gemma4_unified_assistant"
    else:
        model_type = "gemma4_assistant"
    keep = (
        "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
        "num_global_key_value_heads", "attention_k_eq_v", "sliding_window", "rope_parameters",
        "rms_norm_eps", "max_position_embeddings", "hidden_activation", "bos_token_id", "eos_token_id",
        "pad_token_id", "attention_bias",
    )
    text_config = {k: text[k] for k in keep if k in text}
    text_config.update(
        model_type="gemma4_unified_text" if model_type == "gemma4_unified_assistant" else "gemma4_text",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        num_kv_shared_layers=layers,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        use_double_wide_mlp=False,
    )
    if model_type == "gemma4_assistant":
        text_config.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False)
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "backbone_hidden_size": text["hidden_size"],
        "use_ordered_embeddings": False,
        "tie_word_embeddings": True,
        "text_config": text_config,
    }


def new_drafter(target_config: dict, view: TargetView, layers: int, hidden: int, intermediate: int, seed: int):
    config = new_drafter_config(target_config, layers, hidden, intermediate)
    mx.random.seed(seed)
    drafter = Drafter(DrafterArgs.from_dict(config))
    embed = view.text.model.embed_tokens
    if isinstance(embed, nn.QuantizedEmbedding):
        weight = mx.dequantize(
            embed.weight, embed.scales, getattr(embed, "biases", None), embed.group_size, embed.bits, embed.mode
        )
    else:
        weight = embed.weight
    if weight.shape[1] == hidden:
        # The target's tied head is the best first guess for the drafter's tied head.
        drafter.model.embed_tokens.weight = weight.astype(mx.float32)
    else:
        drafter.model.embed_tokens.weight = mx.random.normal(weight.shape[:1] + (hidden,)) * hidden**-0.5
    drafter.update(cast_floats(drafter.parameters(), mx.float32))
    return drafter, config


def init_drafter(path: str):
    """An existing drafter (any dtype; quantized ones are dequantized) to train further, float32."""
    from mlx_lm.utils import dequantize_model

    drafter, config = load_drafter(path)
    dequantize_model(drafter)
    drafter.update(cast_floats(drafter.parameters(), mx.float32))
    drafter.train()
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return drafter, config


def save_google_layout(drafter: Drafter, config: dict, out: Path, dtype=mx.float32) -> None:
    """model.safetensors + config.json as Google's assistant uploads are laid out (what both
    transformers and our loader read): HF names, int64 token ordering, no quantization."""
    weights = {}
    for name, value in tree_flatten(drafter.parameters()):
        if name == "masked_embedding.token_ordering":
            weights[name] = value.astype(mx.int64)
        else:
            weights[name] = value.astype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    config = with_dtype(config, DTYPE_NAMES[dtype])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- the loop --------------------------------------------------------------------------------


def windows(stream: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> mx.array:
    starts = rng.integers(0, stream.size - seq_len + 1, size=batch)
    return mx.array(np.stack([stream[s : s + seq_len] for s in starts]))


def eval_windows(stream: np.ndarray, cfg: TrainConfig) -> list:
    """Fixed, evenly spaced held-out windows (same every evaluation)."""
    starts = np.linspace(0, stream.size - cfg.seq_len, cfg.eval_windows).astype(int)
    rows = np.stack([stream[s : s + cfg.seq_len] for s in starts])
    return [mx.array(rows[i : i + cfg.batch]) for i in range(0, len(rows), cfg.batch)]


def evaluate(drafter: Drafter, view: TargetView, batches: list, block: int) -> list:
    """Greedy acceptance per draft position on the held-out windows."""
    accepted, drafted = np.zeros(block), np.zeros(block)
    for tokens in batches:
        a, d = greedy_acceptance(drafter, target_features(view, tokens), tokens, block)
        accepted += a
        drafted += d
    return (accepted / np.maximum(drafted, 1)).tolist()


def trainable(drafter: Drafter) -> None:
    drafter.unfreeze()
    if drafter.args.use_ordered_embeddings:
        # the centroid router was fit to these token rows: keep the head as it is
        drafter.model.embed_tokens.freeze()
        drafter.masked_embedding.freeze()


def train(
    drafter: Drafter,
    view: TargetView,
    train_stream: np.ndarray,
    held_stream: np.ndarray,
    cfg: TrainConfig,
    report: Optional[Callable] = None,
) -> dict:
    """Train in place. report(step, loss, acceptance or None) is called after every step."""
    trainable(drafter)
    drafter.train()
    warmup = min(cfg.warmup, max(1, cfg.steps // 10))
    schedule = optim.join_schedules(
        [optim.linear_schedule(cfg.lr / warmup, cfg.lr, warmup),
         optim.cosine_decay(cfg.lr, max(1, cfg.steps - warmup), end=cfg.lr * 0.1)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(drafter, lambda features: distill_loss(drafter, features, cfg.block))
    rng = np.random.default_rng(cfg.seed)
    held = eval_windows(held_stream, cfg)
    history = {"loss": [], "acceptance": []}
    before = evaluate(drafter, view, held, cfg.block)
    history["acceptance"].append((0, before))
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        tokens = windows(train_stream, rng, cfg.batch, cfg.seq_len)
        features = target_features(view, tokens)
        loss, grads = loss_and_grad(features)
        optimizer.update(drafter, optim.clip_grad_norm(grads, 1.0)[0])
        mx.eval(loss, drafter.parameters(), optimizer.state)
        history["loss"].append(loss.item())
        acceptance = None
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acceptance = evaluate(drafter, view, held, cfg.block)
            history["acceptance"].append((step, acceptance))
        if report is not None:
            report(step, history["loss"][-1], acceptance)
    history["seconds"] = time.perf_counter() - start
    history["tokens_per_second"] = cfg.steps * cfg.batch * cfg.seq_len / history["seconds"]
    drafter.eval()
    return history


def write_drafter(drafter: Drafter, config: dict, out: Path, force: bool, extra: Optional[dict] = None) -> None:
    """Atomically: a finished folder appears at `out`, or nothing does."""
    with output_folder(out, force) as tmp:
        save_google_layout(drafter, config, tmp)
        if extra is not None:
            (tmp / "training.json").write_text(json.dumps(extra, indent=2) + "\n")


def default_shape(target_hidden: int) -> tuple[int, int, int]:
    """(layers, hidden, intermediate) of a new drafter, after Google's assistants: 4 layers,
    hidden 256 beside targets up to E4B's width and 1024 beside larger ones."""
    hidden = min(target_hidden, 256 if target_hidden <= 2560 else 1024)
    return 4, hidden, 4 * hidden

