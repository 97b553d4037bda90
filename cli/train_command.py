"""`gemma-mtp train-drafter`: self-distill a drafter for a (possibly quantized) target, in MLX."""

from pathlib import Path

import click



@click.command("train-drafter")
@click.option("--target", required=True, metavar="PATH", help="The target: a pair folder, an MLX or HF folder.")
@click.option("--init", "init_path", metavar="DRAFTER", help="Start from this drafter (re-alignment) instead of a new one.")
@click.option("--data", multiple=True, required=True, metavar="FILE_OR_DIR", help="Training text (repeatable).")
@click.option("--out", required=True, type=click.Path(), help="Output drafter folder (Google's layout).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--block", type=click.IntRange(1, 16), default=4, show_default=True, help="Draft steps K unrolled per block.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per step.")
@click.option("--seq-len", type=click.IntRange(min=16), default=256, show_default=True, help="Tokens per window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=50, show_default=True, help="Held-out acceptance every N steps.")
@click.option("--layers", type=click.IntRange(min=1), help="New drafter: layers (default 4).")
@click.option("--hidden", type=click.IntRange(min=8), help="New drafter: hidden size (default 256, 1024 beside large targets).")
@click.option("--intermediate", type=click.IntRange(min=8), help="New drafter: MLP size (default 4 x hidden).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def train_drafter(target, init_path, data, out, steps, lr, block, batch, seq_len, seed, eval_every, layers, hidden,
                  intermediate, force):
    """Train (or re-align) an MTP drafter on the target's own predictions.

    The target runs over the text; the drafter learns the target's next-token distributions K
    positions ahead through the same forward it runs at inference. A held-out tail of the text
    (5%) measures greedy acceptance per draft position."""
    from tqdm import tqdm

    from mlx_gemma_mtp.train import distill as t
    from mlx_gemma_mtp.bench.blas import preload_openblas
    from mlx_gemma_mtp.model.checkpoint import check_output
    from mlx_gemma_mtp.model.loading import check_pair, load

    preload_openblas("train-drafter")
    check_output(out, force)  # an existing or unwritable output fails now, not after training
    if init_path is not None and any(v is not None for v in (layers, hidden, intermediate)):
        raise click.UsageError("--layers/--hidden/--intermediate shape a new drafter; they do not apply with --init")
    cfg = t.TrainConfig(steps=steps, lr=lr, block=block, batch=batch, seq_len=seq_len, seed=seed, eval_every=eval_every)
    pair, tokenizer = load(target, draft=False)
    if t.dequantize_on_cpu(pair.target):
        click.echo("CPU backend: the target's quantized weights are dequantized for training (MLX's CPU quantized "
                   "matmuls are ~10x slower over many tokens; the values, and so the features, are the same)", err=True)
    target_config = pair.target_config
    files = t.data_files(data)
    if init_path is not None:
        drafter, config = t.init_drafter(init_path)
        check_pair(target_config, config)
    else:
        n, h, i = t.default_shape(pair.view.args.hidden_size)
        drafter, config = t.new_drafter(target_config, pair.view, layers or n, hidden or h, intermediate or i, seed)
    train_stream, held_stream = t.split_stream(t.token_stream(files, tokenizer), cfg)
    click.echo(f"training on {train_stream.size:,} tokens from {len(files)} files; "
               f"held out: the last {held_stream.size:,}", err=True)

    bar = tqdm(total=steps, desc="train-drafter", unit="step")
    last = {"acc": None}

    def report(step, loss, acceptance):
        if acceptance is not None:
            last["acc"] = acceptance
        info = {"loss": f"{loss:.4f}"}
        if last["acc"] is not None:
            info["held-out acc"] = ",".join(f"{a:.2f}" for a in last["acc"])
        bar.set_postfix(info, refresh=False)
        bar.update(1)

    history = t.train(drafter, pair.view, train_stream, held_stream, cfg, report)
    bar.close()
    (_, before), (_, after) = history["acceptance"][0], history["acceptance"][-1]
    record = {
        "target": str(target), "init": init_path, "data_files": len(files), "train_tokens": int(train_stream.size),
        "held_out_tokens": int(held_stream.size), "config": vars(cfg),
        "held_out_acceptance_before": before, "held_out_acceptance_after": after,
        "final_loss": history["loss"][-1], "tokens_per_second": history["tokens_per_second"],
    }
    t.write_drafter(drafter, config, Path(out), force, extra=record)
    fmt = lambda acc: ", ".join(f"{a:.3f}" for a in acc)  # noqa: E731
    click.echo(f"held-out greedy acceptance per draft position: before [{fmt(before)}], after [{fmt(after)}]")
    click.echo(f"wrote {out}")
