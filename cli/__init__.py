"""The `gemma-mtp` command."""

import os
import sys

import click

from mlx_gemma_mtp.errors import MTPError


class Main(click.Group):
    """Turns every failure into one line on stderr and a non-zero exit (--debug: the traceback)."""

    def main(self, args=None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("GEMMA_MTP_DEBUG") == "1"
        try:
            return super().main(args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            if debug:
                raise
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except MTPError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # a bug, not bad input: still one line unless --debug
            if debug:
                raise
            click.echo(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=Main)
@click.version_option(package_name="mlx-gemma-mtp")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def main(debug):
    """Gemma 4 with multi-token-prediction (MTP) speculative decoding on MLX."""


def draft_bits_type(value):
    if value is None or str(value).lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected a number of bits or 'none', got '{value}'") from None


@main.command()
@click.option("--target", required=True, metavar="SRC", help="Target checkpoint: a local folder or a hub repo id.")
@click.option("--draft", metavar="SRC", help="Its MTP drafter (assistant): a local folder or a hub repo id.")
@click.option("--out", required=True, type=click.Path(), help="Output pair folder.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the target.")
@click.option("--q-bits", type=int, help="Bits per weight (affine: 2-8, default 4).")
@click.option("--q-group-size", type=int, help="Quantization group size (affine default 64).")
@click.option("--q-mode", type=click.Choice(["affine", "mxfp4", "mxfp8"]), default="affine", show_default=True)
@click.option(
    "--draft-q-bits",
    default="none",
    show_default=True,
    metavar="N|none",
    help="Quantize the drafter too (it is small and its accuracy sets acceptance: default keeps it).",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Default: the checkpoint's.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def convert(target, draft, out, quantize, q_bits, q_group_size, q_mode, draft_q_bits, dtype, force):
    """Convert a Gemma 4 target and its drafter into an MLX pair folder."""
    from mlx_gemma_mtp.convert import convert as run_convert
    from mlx_gemma_mtp.convert import quant_spec

    if not quantize and (q_bits is not None or q_group_size is not None or q_mode != "affine"):
        raise click.UsageError("--q-bits, --q-group-size and --q-mode need -q/--quantize")
    quant = quant_spec(q_bits, q_group_size, q_mode) if quantize else None
    draft_bits = draft_bits_type(draft_q_bits)
    if draft_bits is not None and draft is None:
        raise click.UsageError("--draft-q-bits needs --draft")
    if draft_bits is not None:
        quant_spec(draft_bits, quant.group_size if quant else None, quant.mode if quant else "affine")
    result = run_convert(target, out, draft=draft, quantization=quant, draft_bits=draft_bits, dtype=dtype, force=force)
    summary = f"target {result.target_bits_per_weight:.2f} bits/weight"
    if result.draft_bits_per_weight is not None:
        summary += f", drafter {result.draft_bits_per_weight:.2f} bits/weight"
    click.echo(f"wrote {result.out} ({summary})")


# The other subcommands live in their own modules, which do not import this one.
from .bench_command import bench  # noqa: E402
from .generate_command import chat, generate  # noqa: E402
from .serve_command import serve  # noqa: E402
from .train_command import train_drafter  # noqa: E402

for command in (generate, chat, serve, bench, train_drafter):
    main.add_command(command)
