"""`gemma-mtp serve`: the OpenAI-compatible HTTP server (mlx_gemma_mtp/server/)."""

import os

import click

from mlx_gemma_mtp.cli.generate_command import DraftTokens, cache_kwargs, cache_options, load_model

DEMO_MODEL_ID = "gemma-mtp-demo"


def model_id_of(model, demo):
    if demo:
        return DEMO_MODEL_ID
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


@click.command()
@click.option("--model", metavar="PATH|REPO",
              help="A converted pair folder, or a target: mlx-lm/HF folder or hub repo id.")
@click.option("--draft-model", metavar="PATH|REPO", help="The MTP drafter (default: the pair's own).")
@click.option("--no-draft", is_flag=True, help="Load no drafter: plain decoding.")
@click.option("--demo", is_flag=True, help="Serve the bundled demo pair (offline; raw Python completion, "
                                            "with a plain '<role>: content' chat template).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the default accepts local connections only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests decoding at once; the others wait in the queue.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Most requests waiting for a place in the batch; beyond it the answer is 429.")
@click.option("--num-draft-tokens", type=DraftTokens(), default="adaptive", show_default=True,
              help="Tokens drafted per round for the whole batch, or 'adaptive'. Seeded sampling repeats only "
                   "with a fixed number.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=0), default=2 << 30, show_default=True,
              help="Bytes of KV cache kept between requests for prompt reuse (0: none).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens generated for a request that does not set max_tokens.")
@click.option("--model-id", metavar="NAME", help="The name clients use for the model (default: the folder's "
                                                  "name or repo id; 'gemma-mtp-demo' with --demo).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=16 << 20, show_default=True,
              help="The largest request body; a larger one is refused with 413.")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=10.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM or Ctrl-C: seconds running requests get to finish (new and queued ones get 503); "
                   "what still runs then ends with an error.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (e.g. https://chat.example.com) whose pages may call the API from a browser; "
                   "pages served from localhost may by default. Repeatable; '*' allows any.")
@cache_options
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=20 << 20, show_default=True,
              help="The largest image a request may send or have fetched.")
@click.option("--image-fetch-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="How long fetching an http(s) image_url may take.")
@click.option("--no-remote-images", is_flag=True, help="Refuse http(s) image URLs (data: URLs only).")
@click.option("--allow-local-images", is_flag=True,
              help="Let image_url name files on this machine (a path or file: URL): for local clients only.")
def serve(model, draft_model, no_draft, demo, host, port, max_batch, max_queue, num_draft_tokens,
          prompt_cache_bytes, max_tokens, model_id, max_body_bytes, shutdown_grace, allow_origins, kv_bits,
          kv_group_size, quantized_kv_start, prefill_step_size, log_level, max_image_bytes, image_fetch_timeout,
          no_remote_images, allow_local_images):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    from mlx_gemma_mtp.server.app import serve as run
    from mlx_gemma_mtp.server.images import ImagePolicy
    from mlx_gemma_mtp.model.sharding import launched, launched_group

    if no_draft and draft_model:
        raise click.UsageError("--no-draft and --draft-model contradict each other")
    if demo and (model or draft_model):
        raise click.UsageError("--demo brings its own pair: drop --model/--draft-model")
    if not demo and not model:
        raise click.UsageError("missing option '--model' (or --demo)")
    name = model_id or model_id_of(model, demo)
    options = cache_kwargs(kv_bits, kv_group_size, quantized_kv_start, prefill_step_size)
    group = launched_group() if launched() else None
    if group is not None and group.rank() != 0:  # under mlx.launch: rank 0 serves, the others follow it
        from mlx_gemma_mtp.server.group import follow

        pair, tokenizer = load_model(model, draft_model, no_draft, demo)
        click.echo(f"rank {group.rank()}: following rank 0's engine", err=True)
        follow(pair, tokenizer, num_draft_tokens, prompt_cache_bytes, options)
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding to {host}: the server has no authentication", err=True)

    def ready(worker):  # loaded and warmed up: the first line that says the server serves
        drafter = "no drafter" if worker.pair.drafter is None else f"draft length {worker.draft_tokens}"
        ranks = f", {group.size()} processes" if group is not None else ""
        warm = f"; warmed up in {worker.warm_up_seconds:.1f} s" if worker.warm_up_seconds is not None else ""
        click.echo(f"serving '{name}' ({drafter}, batch {max_batch}{ranks}) on http://{host}:{port}/v1{warm}",
                   err=True)

    run(lambda: load_model(model, draft_model, no_draft, demo), name, host=host, port=port, max_batch=max_batch,
        num_draft_tokens=num_draft_tokens, max_queue=max_queue, prompt_cache_bytes=prompt_cache_bytes,
        default_max_tokens=max_tokens, log_level=log_level, on_ready=ready, cache_options=options,
        allow_origins=allow_origins, max_body_bytes=max_body_bytes, shutdown_grace=shutdown_grace,
        image_policy=ImagePolicy(max_image_bytes, image_fetch_timeout, allow_local_images, not no_remote_images))
