"""`gemma-mtp bench`: mlx-lm, plain and MTP decoding side by side on one pair."""

import json
from pathlib import Path

import click

from mlx_gemma_mtp.bench.shapes import SHAPES

DEFAULT_PROMPTS = [
    "def parse_args(argv):\n    \"\"\"Parse the command line.\"\"\"\n",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
]


def int_list(text: str, what: str = "draft lengths") -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(not 1 <= v <= 16 for v in values):
        raise click.BadParameter(f"{what} must be between 1 and 16")
    return values


def random_prompts(vocab: int, count: int, length: int, seed: int) -> list:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(10, vocab, size=length - 1).tolist() for _ in range(count)]


@click.command()
@click.option("--model", "model_path", metavar="PATH", help="A converted pair folder (target + drafter).")
@click.option("--demo", is_flag=True, help="The bundled demo pair on held-out standard-library prompts (real acceptance).")
@click.option("--held-out-prompts", type=click.IntRange(min=1), metavar="N",
              help="Use N prompts cut from standard-library files the demo pair never saw (default 8 with --demo).")
@click.option("--shape", type=click.Choice(list(SHAPES)), help="Build a random pair with this variant's shapes.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weights of the --shape pair [default: float32, what MLX's CPU matmuls are fast in].")
@click.option("--layers", type=int, default=6, show_default=True, help="Target layers for --shape.")
@click.option("--vocab", type=int, default=32768, show_default=True, help="Vocabulary for --shape.")
@click.option("--experts", type=int, help="Experts per MoE layer for --shape 26b (default: the real 128).")
@click.option("--tokens", type=int, default=64, show_default=True, help="Tokens generated per prompt.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable; --model only).")
@click.option("--prompt-tokens", type=int, default=32, show_default=True, help="Random prompt length for --shape.")
@click.option("--num-prompts", type=int, default=1, show_default=True, help="Random prompts for --shape.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Interleaved repeats; medians are reported.")
@click.option("--ks", "ks", default="1,2,3,4,5,6,7,8", show_default=True, help="Fixed draft lengths to run.")
@click.option("--no-adaptive", is_flag=True, help="Skip the adaptive draft length.")
@click.option("--no-mlx-lm", is_flag=True, help="Skip mlx_lm.stream_generate.")
@click.option("--inject-acceptance", metavar="P1,P2,..", help="Inject this conditional acceptance per draft position.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", "batches", metavar="B1,B2,..",
              help="Batch sizes: run the prompts as rows of one batch (plain, --ks, adaptive) beside one after another.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw speedup and acceptance (matplotlib).")
def bench(model_path, demo, held_out_prompts, shape, dtype, layers, vocab, experts, tokens, prompts, prompt_tokens, num_prompts, repeats, ks,
          no_adaptive, no_mlx_lm, inject_acceptance, seed, batches, json_path, plot_path):
    """Benchmark mlx-lm, plain and MTP decoding (K = 1..8 and adaptive) on the same pair.

    Speeds on machines without Apple Silicon are only meaningful as ratios (see the README)."""
    from mlx_gemma_mtp.bench import report as r
    from mlx_gemma_mtp.bench.blas import preload_openblas

    if sum((model_path is not None, shape is not None, demo)) != 1:
        raise click.UsageError("give exactly one of --model PATH, --demo or --shape NAME")
    if dtype and not shape:
        raise click.UsageError("--dtype is for --shape (a converted pair keeps its own)")
    dtype = dtype or "float32"
    if (prompts or held_out_prompts) and shape:
        raise click.UsageError("--prompt is for --model; --shape uses random prompts (--prompt-tokens)")
    if prompts and held_out_prompts:
        raise click.UsageError("--prompt and --held-out-prompts contradict each other")
    if demo and not prompts and not held_out_prompts:
        held_out_prompts = 8
    batch_sizes = int_list(batches, "batch sizes") if batches else None
    if batch_sizes and plot_path:
        raise click.UsageError("--batch draws no plot")
    if batch_sizes and shape:
        num_prompts = max(num_prompts, max(batch_sizes))
    if batch_sizes and demo and not prompts:
        held_out_prompts = max(held_out_prompts or 0, max(batch_sizes))
    if tokens < 2 or repeats < 1:
        raise click.UsageError("--tokens must be at least 2 and --repeats at least 1")
    # the outputs fail before the long run, not after it
    if json_path:
        r.check_output(json_path, "--json")
    if plot_path:
        r.check_plot_available()
        r.check_output(plot_path, "--plot")

    from mlx_gemma_mtp.bench import run as b

    profile = None
    if inject_acceptance is not None:
        try:
            profile = b.parse_profile(inject_acceptance)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--inject-acceptance") from None

    preload_openblas("bench")

    def log(message):
        click.echo(message, err=True)

    if shape:
        log(f"building a random {dtype} {shape}-shaped pair: {layers} layers, vocab {vocab} ...")
        import mlx.core as mx

        from mlx_gemma_mtp.bench import shapes

        pair = shapes.random_pair(shape, layers, vocab, experts, seed, getattr(mx, dtype))
        tokenizer = shapes.word_tokenizer(vocab)
        prompt_ids = random_prompts(vocab, num_prompts, prompt_tokens, seed)
        description = f"random {dtype} {shape} shapes, {layers} layers, vocab {vocab}"
        if experts:
            description += f", {experts} experts"
    else:
        from mlx_gemma_mtp.model import demo as demo_pair
        from mlx_gemma_mtp import load

        pair, tokenizer = demo_pair.load_demo() if demo else load(model_path)
        if pair.drafter is None:
            raise click.UsageError(f"'{model_path}' has no drafter: the bench compares plain and MTP decoding")
        texts = demo_pair.held_out_prompts(held_out_prompts) if held_out_prompts else (prompts or DEFAULT_PROMPTS)
        prompt_ids = [tokenizer.encode(p) for p in texts]
        description = "demo pair" if demo else str(model_path)
        if held_out_prompts:
            description += f", {len(texts)} held-out standard-library prompts"
    tokenizer.eos_token_ids = set()  # every setting decodes exactly --tokens tokens

    opts = b.BenchOptions(tokens=tokens, repeats=repeats, ks=int_list(ks), adaptive=not no_adaptive,
                          mlx_lm=not no_mlx_lm, inject=profile, seed=seed)
    if batch_sizes:
        if len(prompt_ids) < max(batch_sizes):
            raise click.UsageError(f"--batch {max(batch_sizes)} needs as many prompts, got {len(prompt_ids)}")
        report = {"model": description, **b.bench_batches(pair, prompt_ids, opts, batch_sizes, log=log)}
        click.echo(f"model: {description}\n" + b.format_batches(report))
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
            log(f"wrote {json_path}")
        return
    report = {"model": description, **b.bench(pair, tokenizer, prompt_ids, opts, log=log)}
    report = {"model": description, **{k: v for k, v in report.items() if k != "model"}}
    click.echo(r.format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(r.report_dict(report), indent=2) + "\n")
        log(f"wrote {json_path}")
    if plot_path:
        r.plot(report, plot_path)
        log(f"wrote {plot_path}")
