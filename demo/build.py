"""Build the offline demo pair from the Python standard library's source.

    python demo/build.py [--work build/demo] [--stage all|tokenizer|target|convert|drafter|package]

1. tokenizer: a byte-level BPE (4096 ids; <pad> 0, <eos> 1, <bos> 2 like Gemma) on the training files.
2. target: a 6-layer Gemma 4 text model trained from scratch with the transformers reference
   (PyTorch's CPU build trains small models ~2.5x faster than MLX's CPU backend), written in the
   Hugging Face layout.
3. convert: our converter turns it into an MLX folder (float32).
4. drafter: `gemma-mtp train-drafter` (MLX) trains a new drafter on the converted target.
5. package: the pair, in bfloat16, into mlx_gemma_mtp/demo_pair/ (package data).

`--stage realign` (not part of `all`) runs the re-alignment experiment: the drafter on the 4-bit
target before and after `train-drafter --init`, benchmarked on held-out prompts.

Seeded throughout; needs the test extras (torch, transformers). About 45 minutes on 2 CPU cores.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mlx_gemma_mtp.model import demo

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 4096
PAD, EOS, BOS = 0, 1, 2
SEQ = 256
TARGET = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    global_head_dim=64,
    sliding_window=128,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    max_position_embeddings=4096,
    final_logit_softcapping=30.0,
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    num_kv_shared_layers=0,
    enable_moe_block=False,
    use_double_wide_mlp=False,
    tie_word_embeddings=True,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- 1. tokenizer -----------------------------------------------------------------------------


def train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train_files, _ = demo.split_files()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((demo.read_text(p) for p in train_files), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True
    )
    # a plain chat template, so `gemma-mtp serve --demo` has a chat endpoint; the model itself is
    # trained on raw Python source only
    fast.chat_template = demo.CHAT_TEMPLATE
    fast.save_pretrained(out)
    log(f"tokenizer: {tok.get_vocab_size()} ids -> {out}")


def encode_corpus(tokenizer_dir: Path, files) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = []
    for batch_start in range(0, len(files), 64):
        texts = [demo.read_text(p) for p in files[batch_start : batch_start + 64]]
        for enc in tok(texts, add_special_tokens=False)["input_ids"]:
            ids += [BOS, *enc, EOS]
    return np.array(ids, dtype=np.int32)


# --- 2. target ----------------------------------------------------------------------------------


def train_target(work: Path, steps: int, batch: int, lr: float, seed: int) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    train_files, _ = demo.split_files()
    stream = encode_corpus(work / "tokenizer", train_files)
    log(f"target: {stream.size:,} training tokens from {len(train_files)} files")
    config = tf.Gemma4TextConfig(
        vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **TARGET
    )
    model = tf.Gemma4ForCausalLM(config).float()
    model.train()
    log(f"target: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng(seed)
    start, tokens_seen = time.perf_counter(), 0
    for step in range(steps):
        offsets = rng.integers(0, stream.size - SEQ, size=batch)
        x = torch.from_numpy(np.stack([stream[o : o + SEQ] for o in offsets]).astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += batch * SEQ
        if step % 25 == 0 or step == steps - 1:
            rate = tokens_seen / (time.perf_counter() - start)
            log(f"target step {step}/{steps} loss {loss.item():.3f} lr {lr_at(step):.2e} {rate:.0f} tok/s")
    out = work / "target-hf"
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (work / "tokenizer" / name).exists():
            shutil.copy(work / "tokenizer" / name, out / name)
    log(f"target -> {out}")


# --- 3.-5. convert, drafter, package -------------------------------------------------------------


def convert_target(work: Path) -> None:
    from mlx_gemma_mtp.convert import convert

    convert(str(work / "target-hf"), work / "target-mlx", dtype="float32", force=True)
    log(f"target converted -> {work / 'target-mlx'}")


def train_drafter(work: Path, steps: int, seed: int) -> None:
    shape = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--lr", "2e-3"]
    log("drafter: gemma-mtp train-drafter ...")
    subprocess.run(train_drafter_command(work / "target-mlx", work / "drafter", steps, seed, shape), check=True)


def package(work: Path) -> None:
    from mlx_gemma_mtp.convert import convert

    out = demo.PAIR_DIR
    convert(str(work / "target-hf"), out, draft=str(work / "drafter"), dtype="bfloat16", force=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"demo pair -> {out} ({size / 1e6:.1f} MB)")


def train_drafter_command(target: Path, out: Path, steps: int, seed: int, extra: list) -> list:
    train_files, _ = demo.split_files()
    command = [
        sys.executable, "-m", "mlx_gemma_mtp.cli", "train-drafter", "--target", str(target), "--out", str(out),
        "--force", "--steps", str(steps), "--block", "3", "--batch", "8", "--seq-len", "256",
        "--eval-every", "50", "--seed", str(seed), *extra,
    ]
    for path in train_files:
        command += ["--data", str(path)]
    return command


def bench(pair: Path, json_path: Path, ks: str = "1,2,3,4") -> dict:
    command = [sys.executable, "-m", "mlx_gemma_mtp.cli", "bench", "--model", str(pair), "--held-out-prompts", "8",
               "--ks", ks, "--tokens", "64", "--repeats", "3", "--json", str(json_path)]
    subprocess.run(command, check=True)
    return json.loads(json_path.read_text())


def realign(work: Path, steps: int, seed: int, bits: int = 4) -> None:
    """The drafter trained for the float32 target, on the quantized target, before and after
    `train-drafter --init` re-aligns it to the quantized target (held-out prompts, greedy)."""
    from mlx_gemma_mtp.convert import QuantSpec, convert

    results = ROOT / "benchmarks" / "results"
    quant, tag = QuantSpec(bits, 64, "affine"), f"{bits}bit"
    convert(str(work / "target-hf"), work / f"pair-{tag}", draft=str(work / "drafter"), quantization=quant,
            dtype="float32", force=True)
    before = bench(work / f"pair-{tag}", results / f"demo_{tag}_before_realign.json")
    subprocess.run(train_drafter_command(work / f"pair-{tag}", work / f"drafter-{tag}", steps, seed,
                                         ["--init", str(work / "drafter"), "--lr", "5e-4"]), check=True)
    convert(str(work / "target-hf"), work / f"pair-{tag}-realigned", draft=str(work / f"drafter-{tag}"),
            quantization=quant, dtype="float32", force=True)
    after = bench(work / f"pair-{tag}-realigned", results / f"demo_{tag}_after_realign.json")
    for name, report in (("before", before), ("after", after)):
        for entry in report["mtp"]:
            log(f"{bits}-bit target, {name} re-alignment: K={entry['num_draft_tokens']} speedup {entry['speedup']:.2f} "
                f"acceptance {[None if a is None else round(a, 3) for a in entry['acceptance_per_position']]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "build" / "demo"))
    parser.add_argument("--stage", default="all",
                        choices=["all", "tokenizer", "target", "convert", "drafter", "package", "realign"])
    parser.add_argument("--target-steps", type=int, default=700)
    parser.add_argument("--target-batch", type=int, default=16)
    parser.add_argument("--target-lr", type=float, default=2e-3)
    parser.add_argument("--drafter-steps", type=int, default=450)
    parser.add_argument("--realign-steps", type=int, default=200)
    parser.add_argument("--realign-bits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = ["tokenizer", "target", "convert", "drafter", "package"] if args.stage == "all" else [args.stage]
    if "tokenizer" in stages:
        train_tokenizer(work / "tokenizer")
    if "target" in stages:
        train_target(work, args.target_steps, args.target_batch, args.target_lr, args.seed)
    if "convert" in stages:
        convert_target(work)
    if "drafter" in stages:
        train_drafter(work, args.drafter_steps, args.seed)
    if "package" in stages:
        package(work)
    if args.stage == "realign":  # the re-alignment experiment, not part of the build
        realign(work, args.realign_steps, args.seed, args.realign_bits)


if __name__ == "__main__":
    main()
