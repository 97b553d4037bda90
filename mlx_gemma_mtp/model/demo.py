"""The offline demo pair: where it lives and the text it was trained on.

The demo target and its drafter were trained on the Python standard library's own source, which
every machine with Python has. Files are split into training and held-out sets by a hash of
their path inside the library, so the split is the same on every machine; prompts and acceptance
figures use held-out files only.
"""

import sysconfig
import zlib
from pathlib import Path

PAIR_DIR = Path(__file__).parents[1] / "demo_pair"
HELD_OUT_EVERY = 20  # one file in 20 is never trained on

# The demo target's chat template (in demo_pair/target/tokenizer_config.json), for `gemma-mtp serve
# --demo`'s chat endpoint. The model only completes Python source and never learnt turns, so this
# is a plain format: "<bos>", one "tool: {json}" line per tool, then "role: content" lines (an
# assistant's tool calls in Gemma 4's markers, <|tool_call>call:NAME{json}<tool_call|>, so mlx-lm
# infers Gemma 4's tool parser), then "assistant:" to prompt a reply.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{%- for tool in tools -%}{{ 'tool: ' + (tool | tojson) + '\\n' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ message.role + ':' }}"
    "{%- if message.content is string and message.content -%}{{ ' ' + message.content }}{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{ '<|tool_call>call:' + call.function.name + (call.function.arguments | tojson) + '<tool_call|>' }}"
    "{%- endfor -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'assistant:' }}{%- endif -%}"
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the standard library (no site-packages), sorted by relative path."""
    root = stdlib_dir()
    files = [
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(path: Path) -> bool:
    rel = path.relative_to(stdlib_dir()).as_posix()
    return zlib.crc32(rel.encode()) % HELD_OUT_EVERY == 0


def split_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files)."""
    files = stdlib_files()
    held = [p for p in files if is_held_out(p)]
    return [p for p in files if not is_held_out(p)], held


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def held_out_prompts(count: int, min_chars: int = 2000, prompt_lines: int = 12) -> list[str]:
    """Prompts cut from held-out files: the first `prompt_lines` lines of a top-level function.

    Deterministic: the same files in the same order on every run.
    """
    _, held = split_files()
    prompts = []
    for path in held:
        text = read_text(path)
        if len(text) < min_chars:
            continue
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith(("def ", "class "))]
        if not starts:
            continue
        start = starts[len(starts) // 2]
        prompts.append("\n".join(lines[start : start + prompt_lines]) + "\n")
        if len(prompts) == count:
            break
    return prompts


def demo_available() -> bool:
    from mlx_gemma_mtp.model.checkpoint import has_manifest

    return has_manifest(PAIR_DIR)


def load_demo(draft: bool = True):
    """The bundled pair (without its drafter if not `draft`). Shipped in bfloat16 to stay small;
    on the CPU it computes in float32 (MLX's CPU matmuls are fast in float32 only)."""
    import mlx.core as mx

    from mlx_gemma_mtp.model.loading import load
    from mlx_gemma_mtp.errors import MTPError

    if not demo_available():
        raise MTPError(f"the demo pair is missing from {PAIR_DIR} (rebuild it: python demo/build.py)")
    pair, tokenizer = load(str(PAIR_DIR), draft=draft)
    if mx.default_device() == mx.cpu:
        pair.target.set_dtype(mx.float32)
        if pair.drafter is not None:
            pair.drafter.set_dtype(mx.float32)
    return pair, tokenizer
