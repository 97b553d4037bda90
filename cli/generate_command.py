"""`gemma-mtp generate` (one prompt, streamed) and `gemma-mtp chat` (a multi-turn REPL)."""

import math
import os
import sys
import time
from dataclasses import dataclass

import click

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.limits import MAX_DRAFT_TOKENS, MAX_SEED, fit_max_tokens
from mlx_gemma_mtp.model.sharding import is_writer, launched

INTERRUPTED = 130  # the shell's exit status for SIGINT


# ---- option types ---------------------------------------------------------------------------


class DraftTokens(click.ParamType):
    """A draft length: a whole number in 0..MAX_DRAFT_TOKENS, or 'adaptive'. Checked while the
    command line is parsed, so a bad value fails before anything is read or loaded."""

    name = "K|adaptive"

    def convert(self, value, param, ctx):
        if value == "adaptive":
            return value
        try:
            k = int(value)
        except ValueError:
            self.fail(f"expected a number of tokens or 'adaptive', got '{value}'", param, ctx)
        if not 0 <= k <= MAX_DRAFT_TOKENS:
            self.fail(f"must be between 0 and {MAX_DRAFT_TOKENS} (or 'adaptive'), got {k}", param, ctx)
        return k


def finite(ctx, param, value):
    # click's FloatRange lets nan through (every comparison with nan is false)
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}", ctx, param)
    return value


def model_options(f):
    """The flags `generate` and `chat` share: model, drafter, sampling, draft length."""
    options = [
        click.option("--model", metavar="PATH|REPO",
                     help="A converted pair folder, or a target: mlx-lm/HF folder or hub repo id."),
        click.option("--draft-model", metavar="PATH|REPO", help="The MTP drafter (default: the pair's own)."),
        click.option("--no-draft", is_flag=True, help="Load no drafter: plain decoding."),
        click.option("--num-draft-tokens", type=DraftTokens(), default="adaptive", show_default=True,
                     help="Tokens drafted per round, or 'adaptive'."),
        click.option("--system", metavar="TEXT", help="A system message."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Most tokens generated per reply."),
        click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True, callback=finite,
                     help="Sampling temperature; 0 is greedy (exactly the target's greedy output)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     callback=finite, help="Nucleus sampling: keep the smallest set with this mass."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Keep the K most likely tokens; 0 keeps all."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True, callback=finite,
                     help="Drop tokens less likely than this fraction of the top one."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), callback=finite,
                     help="Penalize tokens already in the context (1 is none)."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), help="Random seed for sampling."),
        click.option("--verbose", is_flag=True, help="More detail on stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def cache_options(f):
    """The KV cache and prefill flags `generate`, `chat` and `serve` share (mlx-lm's names)."""
    options = [
        click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
                     help="Quantize the KV cache to this many bits (default: a float cache)."),
        click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
                     help="Group size of the KV cache quantization (along the head dimension)."),
        click.option("--quantized-kv-start", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Quantize the KV cache once the context passes this many tokens (0: from the first)."),
        click.option("--prefill-step-size", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Most prompt tokens one prefill forward takes (bounds the prefill's activations)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def cache_kwargs(kv_bits, kv_group_size, quantized_kv_start, prefill_step_size) -> dict:
    return {"kv_bits": None if kv_bits is None else int(kv_bits), "kv_group_size": int(kv_group_size),
            "quantized_kv_start": quantized_kv_start, "prefill_step_size": prefill_step_size}


PROGRESS_FROM = 4096  # prompts longer than this show a prefill progress bar on stderr


def prefill_bar(prompt_tokens: int):
    """(callback, close) for a prefill progress bar, or (None, no-op) for a short prompt."""
    if prompt_tokens <= PROGRESS_FROM:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=prompt_tokens, desc="prefill", unit="tok", file=sys.stderr, leave=False)

    def update(done, total):
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


# ---- loading and prompts --------------------------------------------------------------------


def load_model(model, draft_model, no_draft, demo=False):
    from mlx_gemma_mtp import load

    if no_draft and draft_model:
        raise click.UsageError("--no-draft and --draft-model contradict each other")
    if demo:
        from mlx_gemma_mtp.model.demo import load_demo

        if model or draft_model:
            raise click.UsageError("--demo brings its own pair: drop --model/--draft-model")
        return load_demo(draft=not no_draft)
    if not model:
        raise click.UsageError("missing option '--model'")
    # --no-draft never resolves, downloads or reads a drafter, even a pair's own
    pair, tokenizer = load(model, draft_path=draft_model, draft=not no_draft)
    if pair.drafter is None and not no_draft:
        say_which_drafter(model, pair.target_config)
    return pair, tokenizer


def say_which_drafter(model, target_config: dict) -> None:
    """A target given without a drafter decodes plainly: say so, and which drafter would fit it."""
    from mlx_gemma_mtp.model.config import suggested_drafters

    drafters = suggested_drafters(target_config)
    if not drafters:
        click.echo("note: no drafter: decoding without MTP (--draft-model adds one, --no-draft silences this)",
                   err=True)
        return
    google, community = drafters
    click.echo(f"note: no drafter: decoding without MTP. This target's MTP drafter is {google} "
               f"(converted: {community}); add it with --draft-model {community}, or convert a pair once with "
               f"`gemma-mtp convert --target {model} --draft {google} --out PAIR` (--no-draft silences this)",
               err=True)


def utf8(data: bytes, where: str, start: int = 0) -> str:
    """`data` decoded as UTF-8; anything else is an MTPError naming `where` and the byte offset
    (counted from `start`, the offset of `data` in its stream)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MTPError(f"{where} is not UTF-8: byte 0x{data[e.start]:02x} at offset {start + e.start} "
                       f"({e.reason})") from None


def argument_text(value, option):
    """A command-line text as it was typed. Python decodes argv with surrogateescape, so bytes that
    are not UTF-8 arrive as lone surrogates, which the tokenizer cannot encode."""
    if value is None:
        return None
    try:
        return utf8(value.encode("utf-8", "surrogateescape"), option)
    except UnicodeEncodeError as e:
        raise MTPError(f"{option} is not UTF-8: character {e.start} is a lone surrogate") from None


def read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stand-in for stdin
        return argument_text(sys.stdin.read(), "stdin")
    return utf8(stream.read(), "stdin")


def read_prompt(prompt):
    """--prompt TEXT, or stdin when --prompt is absent (or '-') and stdin is not a terminal."""
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("no prompt: pass --prompt TEXT or pipe it on stdin")
        prompt = read_stdin()
        if prompt.endswith("\n"):
            prompt = prompt[:-1]  # the newline `echo` and editors add is not part of the prompt
    else:
        prompt = argument_text(prompt, "--prompt")
    if not prompt.strip():
        raise MTPError("the prompt is empty")
    return prompt


def messages_for(system, user=None, images: int = 0):
    messages = [{"role": "system", "content": system}] if system else []
    if user is not None:
        messages.append(user_message(user, images))
    return messages


def user_message(text, images: int = 0) -> dict:
    """A user turn; with images, content parts as chat templates take them (Gemma 4's writes an
    image placeholder per image part, which the API fills with the images in order)."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def chat_tokens(tokenizer, messages):
    if not getattr(tokenizer, "has_chat_template", False):
        raise MTPError("the model's tokenizer has no chat template (use --raw to send the prompt as is)")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def draft_tokens(pair, num_draft_tokens):
    return num_draft_tokens if pair.drafter is not None else 0


def sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed):
    return dict(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed)


# ---- streaming and summaries ----------------------------------------------------------------


@dataclass
class Tally:
    """What the command has seen itself, for a summary when Ctrl-C cuts generation short."""

    start: float
    tokens: int = 0
    drafted: int = 0

    def add(self, response):
        self.tokens += 1
        self.drafted += bool(response.from_draft)

    def line(self):
        seconds = time.perf_counter() - self.start
        rate = self.tokens / seconds if seconds else 0.0
        return (f"interrupted: {self.tokens} tokens ({self.drafted} from drafts) in {seconds:.2f} s "
                f"including the prompt, {rate:.1f} tok/s")


def stream(pair, tokenizer, prompt, tally, **kwargs):
    """Write the reply to stdout as it comes; returns (text, last response)."""
    from mlx_gemma_mtp import stream_generate

    parts, last = [], None
    progress, close_bar = prefill_bar(len(prompt))
    responses = stream_generate(pair, tokenizer, prompt, prefill_progress=progress, **kwargs)
    try:
        for r in responses:
            close_bar()
            tally.add(r)
            sys.stdout.write(r.text)
            sys.stdout.flush()
            parts.append(r.text)
            last = r
    finally:
        close_bar()
        responses.close()  # on Ctrl-C too: the generator settles its prompt cache now, not at GC
    return "".join(parts), last


def summary(stats, drafting):
    line = (f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_second:.1f} tok/s | "
            f"generation: {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s | ")
    if drafting and stats.rounds:
        line += f"{stats.tokens_per_round:.2f} tokens/round | "
    line += f"peak memory {size(stats.peak_memory_bytes)}"
    lines = [line]
    if drafting and stats.acceptance_per_position:
        lines.append("acceptance per position: " + " ".join(f"{a:.2f}" for a in stats.acceptance_per_position))
    return lines


def size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def details(stats, finish_reason):
    accepted = " ".join(f"{a}/{d}" for a, d in zip(stats.accepted_per_position, stats.drafted_per_position))
    return [f"rounds: {stats.rounds}, accepted/drafted per position: {accepted or '-'}, finish: {finish_reason}"]


def report(last, drafting, verbose):
    if last is None or last.stats is None:
        click.echo("no finished reply yet", err=True)
        return
    for line in summary(last.stats, drafting):
        click.echo(line, err=True)
    if verbose:
        for line in details(last.stats, last.finish_reason):
            click.echo(line, err=True)


# ---- commands -------------------------------------------------------------------------------


@click.command()
@model_options
@cache_options
@click.option("--prompt", metavar="TEXT", help="The prompt ('-' or absent: read stdin).")
@click.option("--chat/--raw", "use_chat", default=None,
              help="Apply the tokenizer's chat template (system + user turn; the default), or send the prompt "
                   "as is (the default with --demo).")
@click.option("--demo", is_flag=True,
              help="Use the bundled demo pair (a small Gemma 4 trained on Python's standard library): "
                   "works offline, completes Python source.")
@click.option("--image", "images", metavar="PATH", multiple=True,
              help="An image for the prompt (repeatable; PNG, JPEG, WebP, GIF, BMP, TIFF): in the user turn "
                   "before the text, or with --raw at the prompt's image placeholders (else at its start).")
def generate(model, draft_model, no_draft, num_draft_tokens, system, max_tokens, temp, top_p, top_k, min_p,
             repetition_penalty, seed, verbose, kv_bits, kv_group_size, quantized_kv_start, prefill_step_size,
             prompt, use_chat, demo, images):
    """Generate a reply to one prompt, streamed to stdout; a summary goes to stderr."""
    if demo and use_chat:
        raise click.UsageError("the demo pair is a raw-text model (its plain chat template is for serve): drop --chat")
    use_chat = not demo if use_chat is None else use_chat
    if launched() and prompt in (None, "-"):
        raise click.UsageError("under mlx.launch pass the prompt with --prompt (stdin reaches one process only)")
    text, system = read_prompt(prompt), argument_text(system, "--system")
    if system and not use_chat:
        raise click.UsageError("--system needs the chat template (drop --raw)")
    pair, tokenizer = load_model(model, draft_model, no_draft, demo)
    quiet = not is_writer(pair.group)
    if quiet:  # every rank decodes the same tokens: rank 0 writes them
        sys.stdout = open(os.devnull, "w")
    ids = chat_tokens(tokenizer, messages_for(system, text, len(images))) if use_chat else tokenizer.encode(text)
    max_tokens = fit_max_tokens(len(ids), max_tokens, pair.view.args.max_position_embeddings)
    drafting = draft_tokens(pair, num_draft_tokens) != 0
    if verbose and not quiet:
        click.echo(f"prompt: {len(ids)} tokens ({'chat template' if use_chat else 'raw'}), "
                   f"drafter: {'yes' if pair.drafter is not None else 'none'}", err=True)

    if demo:
        sys.stdout.write(text)  # a completion reads as a whole with its prompt
        sys.stdout.flush()
    tally = Tally(time.perf_counter())
    try:
        reply, last = stream(pair, tokenizer, ids, tally, max_tokens=max_tokens,
                         num_draft_tokens=draft_tokens(pair, num_draft_tokens), images=list(images),
                         **cache_kwargs(kv_bits, kv_group_size, quantized_kv_start, prefill_step_size),
                         **sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        click.echo(tally.line(), err=True)
        sys.exit(INTERRUPTED)
    if not reply.endswith("\n"):
        sys.stdout.write("\n")  # end the line for the shell, not a second one
        sys.stdout.flush()
    if not quiet:
        report(last, drafting, verbose)


HELP = ("commands: /image PATH (an image for the next turn), /reset (new conversation), /stats (the last reply), "
        "/quit (or end of input)")


@click.command()
@model_options
@cache_options
def chat(model, draft_model, no_draft, num_draft_tokens, system, max_tokens, temp, top_p, top_k, min_p,
         repetition_penalty, seed, verbose, kv_bits, kv_group_size, quantized_kv_start, prefill_step_size):
    """Chat on stdin/stdout, keeping the KV cache between turns."""
    from mlx_gemma_mtp import make_prompt_cache

    if launched():
        raise MTPError("chat does not run over several processes (mlx.launch); use generate --prompt")
    system = argument_text(system, "--system")
    pair, tokenizer = load_model(model, draft_model, no_draft)
    if not getattr(tokenizer, "has_chat_template", False):
        raise MTPError("the model's tokenizer has no chat template, which chat needs")
    k = draft_tokens(pair, num_draft_tokens)
    sampling = sampling_kwargs(temp, top_p, top_k, min_p, repetition_penalty, seed)
    sampling.update(cache_kwargs(kv_bits, kv_group_size, quantized_kv_start, prefill_step_size))
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(HELP, err=True)

    messages, cache, last = messages_for(system), make_prompt_cache(pair), None
    # the conversation's images in order, and those for the next turn: every turn sends them all
    # again, and the prompt cache (keyed by their content) computes none of the earlier ones
    images, pending = [], []
    lines = Lines()
    while True:
        try:
            line = lines.read(interactive)
        except MTPError as e:
            if not interactive:
                raise  # piped input cannot be typed again
            click.echo(f"error: {e}", err=True)
            continue
        if line is None or line in ("/quit", "/exit"):
            return
        if not line:
            continue
        if line == "/reset":
            messages, cache, last = messages_for(system), make_prompt_cache(pair), None
            images, pending = [], []
            click.echo("(new conversation)", err=True)
            continue
        if line == "/stats":
            report(last, k != 0, True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path or not line.startswith("/image "):
                click.echo("usage: /image PATH", err=True)
            elif not os.path.isfile(path):
                click.echo(f"error: image '{path}' is not a file", err=True)
            else:
                pending.append(path)
                click.echo(f"(image {path} goes with the next turn)", err=True)
            continue
        if line.startswith("/"):
            click.echo(f"unknown command '{line}'; {HELP}", err=True)
            continue

        turn = messages + [user_message(line, len(pending))]
        ids = chat_tokens(tokenizer, turn)
        try:
            budget = fit_max_tokens(len(ids), max_tokens, pair.view.args.max_position_embeddings)
        except MTPError as e:
            # the conversation outgrew the context: the session goes on, the turn is dropped
            click.echo(f"error: {e} (/reset starts a new conversation)", err=True)
            continue

        tally = Tally(time.perf_counter())
        try:
            reply, last = stream(pair, tokenizer, ids, tally, max_tokens=budget, num_draft_tokens=k,
                                 prompt_cache=cache, images=images + pending, **sampling)
        except MTPError as e:  # a bad image: the turn is dropped, the session goes on
            pending = []
            click.echo(f"error: {e}", err=True)
            continue
        except KeyboardInterrupt:
            # the interrupt may have landed while the API was settling the cache: start a fresh
            # one, and drop the unfinished turn so the conversation stays what the model has seen
            cache = make_prompt_cache(pair)
            sys.stdout.write("\n")
            sys.stdout.flush()
            click.echo(tally.line(), err=True)
            continue
        sys.stdout.write("\n")  # each reply ends with a line break, so piped replies stay apart
        sys.stdout.flush()
        messages = turn + [{"role": "assistant", "content": reply}]
        images, pending = images + pending, []
        if verbose and last is not None and last.stats is not None:
            s = last.stats
            click.echo(f"prompt: {len(ids)} tokens, {s.prompt_tokens} processed, "
                       f"{s.reused_prompt_tokens} reused from the cache", err=True)
            report(last, k != 0, True)


class Lines:
    """User lines from stdin, decoded as UTF-8; counts the bytes read so an error can say where."""

    def __init__(self):
        self.offset = 0

    def read(self, interactive):
        """The next line, or None at the end of input (or Ctrl-C at the prompt)."""
        if interactive:
            click.echo("> ", nl=False)
        stream = getattr(sys.stdin, "buffer", None)
        try:
            raw = stream.readline() if stream is not None else sys.stdin.readline()
        except KeyboardInterrupt:
            click.echo("")
            return None
        if not raw:
            return None
        start, self.offset = self.offset, self.offset + len(raw)
        line = utf8(raw, "stdin", start) if stream is not None else argument_text(raw, "stdin")
        return line.strip()
