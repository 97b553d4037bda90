"""OpenBLAS for MLX's CPU backend on Linux: `gemma-mtp bench` and `train-drafter` re-run themselves
with it preloaded.

MLX's Linux CPU wheel bundles the reference BLAS, which makes multi-token forwards (verification,
training) look far slower than they are on a Mac (see shared/design/measuring.md).
"""

import os
import platform
import sys
from typing import Optional

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
REEXEC_MARK = "GEMMA_MTP_BENCH_REEXEC"  # set in the re-executed process: it never re-executes again


def openblas_loaded(env: dict = os.environ) -> bool:
    return "openblas" in env.get("LD_PRELOAD", "")


def command_line() -> list:
    """This process's arguments after the interpreter, as `python` was given them."""
    return sys.orig_argv[1:] if hasattr(sys, "orig_argv") else sys.argv


def preload_openblas(command: str, argv: Optional[list] = None, env: dict = os.environ,
                     log=lambda m: print(m, file=sys.stderr)) -> None:
    """On Linux, re-exec this process with OpenBLAS preloaded when `command` (a `gemma-mtp`
    subcommand) is on its command line; warn when OpenBLAS is not installed. A GPU build of MLX
    needs neither. Returns only when nothing is re-executed."""
    import mlx.core as mx

    argv = command_line() if argv is None else argv
    if platform.system() != "Linux" or openblas_loaded(env) or env.get(REEXEC_MARK):
        return
    if mx.default_device().type == mx.gpu:
        return
    if command not in argv:  # only the command line re-executes itself, never a host program
        return
    found = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
    if found is None:
        log("warning: OpenBLAS not found (apt-get install libopenblas0-pthread): multi-token forwards use "
            "MLX's bundled reference BLAS and make speculative decoding look far slower than on a Mac")
        return
    preload = ":".join(x for x in (found, env.get("LD_PRELOAD", "")) if x)
    log(f"re-running with LD_PRELOAD={found} (OpenBLAS) for memory-bound matmuls on the CPU")
    os.execve(sys.executable, [sys.executable] + argv, {**env, "LD_PRELOAD": preload, REEXEC_MARK: "1"})
