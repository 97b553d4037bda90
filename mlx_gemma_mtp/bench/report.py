"""The bench's report: the table on stdout, the JSON file and the plot, and the checks that
`--json`/`--plot` can be written before the run starts (a bench can take many minutes)."""

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mlx_gemma_mtp.errors import MTPError

PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))


def check_output(path: str, option: str) -> None:
    """Raise MTPError naming `path` and the cause when `option`'s file cannot be written there."""

    def fail(cause):
        raise MTPError(f"cannot write the {option} file '{path}': {cause}")

    resolved = Path(os.path.abspath(path)).resolve()
    for pseudo in PSEUDO_FILESYSTEMS:
        if resolved == pseudo or pseudo in resolved.parents:
            fail(f"{pseudo} is the kernel's pseudo-filesystem, not a place for files")
    if os.path.isdir(path):
        fail("it is a folder")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            fail("the file is not writable")
        return
    parent = Path(path).parent
    existing = next((f for f in (parent, *parent.parents) if os.path.exists(f)), parent)
    if not os.path.isdir(existing):
        fail(f"'{existing}' is not a folder")
    if existing != parent:
        fail(f"folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"folder '{parent}' is not writable")


def check_plot_available() -> None:
    """--plot needs matplotlib: say so before the run, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MTPError("--plot needs matplotlib (pip install matplotlib)") from None


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def format_report(report: dict) -> str:
    lines = []
    if report["acceptance_injected"]:
        lines.append(f"ACCEPTANCE INJECTED: conditional per-position profile {report['injected_profile']} "
                     "(drafts replaced by the target's greedy tokens; the drafter still runs)")
    else:
        lines.append("acceptance: the drafter's own (not injected)")
    lines.append(f"model: {report.get('model', '?')}; {report['machine']}; {report.get('device', 'cpu')}; "
                 f"OpenBLAS preloaded: {report['openblas_preloaded']}")
    lines.append(f"{report['tokens']} tokens x {report['prompts']} prompt(s), median of {report['repeats']} repeats")
    plain = report["plain_tokens_per_second"]
    if report.get("mlx_lm_tokens_per_second"):
        lines.append(f"mlx_lm.stream_generate: {report['mlx_lm_tokens_per_second']:.3f} tok/s, "
                     f"TTFT {report['mlx_lm_ttft_seconds']:.3f} s, peak {report['mlx_lm_peak_memory_bytes'] / 2**30:.2f} GiB")
        lines.append(f"plain (ours): {plain:.3f} tok/s = {report['plain_over_mlx_lm']:.3f}x mlx_lm, "
                     f"TTFT {report['plain_ttft_seconds']:.3f} s, peak {report['plain_peak_memory_bytes'] / 2**30:.2f} GiB")
    else:
        lines.append(f"plain (ours): {plain:.3f} tok/s, TTFT {report['plain_ttft_seconds']:.3f} s")
    st = report["step_seconds"]
    def ms(costs):
        return " ".join(f"{k}:{v * 1e3:.1f}" for k, v in costs.items()) + " ms"

    lines.append(f"step costs: plain {st['plain'] * 1e3:.1f} ms; verify K+1 {ms(st['verify_k_plus_1'])}; "
                 f"draft block K {ms(st['draft_block_k'])}")
    if report.get("draft_compiled") and st.get("draft_block_k_eager"):
        lines.append(f"draft block without mx.compile: {ms(st['draft_block_k_eager'])}")
    lines.append("")
    head = ("K", "tok/s", "speedup", "ideal", "meas/ideal", "tok/round", "draft ms", "verify ms", "host ms",
            "TTFT/plain", "peak/(plain+drafter)", "same output", "acceptance per position")
    lines.append(" | ".join(head))
    lines.append(" | ".join("---" for _ in head))
    for e in report["mtp"]:
        c = e["cost_split"]
        acc = " ".join(_fmt(a) for a in e["acceptance_per_position"] if a is not None)
        lines.append(" | ".join([
            str(e["num_draft_tokens"]), _fmt(e["tokens_per_second"], ".3f"), _fmt(e["speedup"]),
            _fmt(e["ideal_speedup"]), _fmt(e["measured_over_ideal"]), _fmt(e["tokens_per_round"]),
            _fmt(c["draft_seconds"] * 1e3, ".1f"), _fmt(c["verify_seconds"] * 1e3, ".1f"),
            _fmt(None if c["host_seconds"] is None else c["host_seconds"] * 1e3, ".1f"),
            _fmt(e["ttft_over_plain"]), _fmt(e["peak_over_plain_plus_drafter"], ".3f"),
            str(e["matches_plain"]), acc,
        ]))
    adaptive = [e for e in report["mtp"] if e["num_draft_tokens"] == "adaptive"]
    if adaptive:
        lines.append(f"adaptive K per round: {adaptive[0]['k_histogram']}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Speedup vs K and acceptance per position (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from None
    fixed = [e for e in report["mtp"] if e["num_draft_tokens"] != "adaptive"]
    adaptive = [e for e in report["mtp"] if e["num_draft_tokens"] == "adaptive"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ks = [e["num_draft_tokens"] for e in fixed]
    left.plot(ks, [e["speedup"] for e in fixed], "o-", label="measured")
    left.plot(ks, [e["ideal_speedup"] for e in fixed], "s--", label="ideal (measured parts)")
    if adaptive:
        left.axhline(adaptive[0]["speedup"], color="g", linestyle=":", label="adaptive")
    left.axhline(1.0, color="k", linewidth=0.5)
    left.set(xlabel="draft tokens K", ylabel="speedup over plain", title="speedup")
    left.legend()
    for e in fixed:
        acc = [a for a in e["acceptance_per_position"] if a is not None]
        right.plot(range(1, len(acc) + 1), acc, ".-", label=f"K={e['num_draft_tokens']}")
    right.set(xlabel="draft position", ylabel="acceptance", ylim=(0, 1.05), title="acceptance per position")
    right.legend(fontsize=7)
    title = report.get("model", "")
    if report["acceptance_injected"]:
        title += f"\nacceptance INJECTED {report['injected_profile']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report_dict(report: dict) -> dict:
    """The JSON form (dataclasses and numpy values made plain)."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if hasattr(v, "__dataclass_fields__"):
            return plain(asdict(v))
        if isinstance(v, np.generic):
            return v.item()
        return v

    return plain(report)
