"""`gemma-mtp bench`: mlx-lm, our plain path and our MTP path side by side, in one process.

Every setting decodes the same prompts on the same pair, interleaved over the repeats, and is
timed the same way (decode rate from the first generated token to the last; time to first token
from the call). The cost split of a round comes from timing draft-only and verify-only graphs of
the same shapes on a warm cache; host overhead is what the measured round time leaves over.
See shared/design/measuring.md for why everything is a ratio on machines without Apple Silicon.
"""

import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .adaptive import AdaptiveDraft
from .decode import CACHE_SLACK, Pair, Stats, draft_block, generate_tokens, prefill
from .sampling import Sampling

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
REEXEC_MARK = "GEMMA_MTP_BENCH_REEXEC"


# --- the family's shapes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Per-layer shapes of one Gemma 4 variant and of its drafter. Layer count and vocabulary
    are chosen per run; the rest are the real values (where gemma4-formats.md does not state a
    figure, the public configs' values as we know them)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    sliding_per_full: int
    window: int
    real_layers: int
    kv_shared: int = 0  # of real_layers
    per_layer_input: int = 0  # PLE width
    k_eq_v: bool = False
    global_kv_heads: Optional[int] = None
    double_wide_mlp: bool = False
    experts: int = 0
    top_k_experts: int = 0
    moe_intermediate: int = 0
    draft_hidden: int = 1024
    draft_intermediate: int = 4096
    centroid_head: bool = False


SHAPES = {
    "e2b": Shape(1536, 8, 1, 6144, 4, 512, 35, kv_shared=20, per_layer_input=256, double_wide_mlp=True,
                 draft_hidden=256, draft_intermediate=2048, centroid_head=True),
    "e4b": Shape(2560, 8, 2, 10240, 5, 512, 42, kv_shared=18, per_layer_input=256, double_wide_mlp=True,
                 draft_hidden=256, draft_intermediate=2048, centroid_head=True),
    "12b": Shape(3840, 16, 8, 15360, 5, 1024, 48, k_eq_v=True, global_kv_heads=4),
    "26b": Shape(2816, 16, 8, 2112, 5, 1024, 30, k_eq_v=True, global_kv_heads=2,
                 experts=128, top_k_experts=8, moe_intermediate=704),
    "31b": Shape(5376, 32, 16, 21504, 5, 1024, 60, k_eq_v=True, global_kv_heads=4),
}
TOKENS_PER_CENTROID = 128  # 262144 / 2048 in the real E2B/E4B drafters
CENTROID_TOP_K = 32


def layer_types(shape: Shape, layers: int) -> list:
    period = ["sliding_attention"] * shape.sliding_per_full + ["full_attention"]
    types = (period * (layers // len(period) + 1))[:layers]
    types[-1] = "full_attention"
    return types


def kv_shared_layers(shape: Shape, layers: int) -> int:
    """The real share of KV-shared layers, keeping at least one whole period of producers."""
    shared = round(layers * shape.kv_shared / shape.real_layers)
    return max(0, min(shared, layers - shape.sliding_per_full - 1))


def target_args(shape: Shape, layers: int, vocab: int, experts: Optional[int] = None):
    from mlx_lm.models import gemma4_text

    moe = {}
    if shape.experts:
        n = experts or shape.experts
        moe = dict(enable_moe_block=True, num_experts=n, top_k_experts=min(shape.top_k_experts, n),
                   moe_intermediate_size=shape.moe_intermediate)
    return gemma4_text.ModelArgs(
        hidden_size=shape.hidden,
        num_hidden_layers=layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        head_dim=256,
        global_head_dim=512,
        num_key_value_heads=shape.kv_heads,
        num_global_key_value_heads=shape.global_kv_heads,
        num_kv_shared_layers=kv_shared_layers(shape, layers),
        hidden_size_per_layer_input=shape.per_layer_input,
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab if shape.per_layer_input else 0,
        sliding_window=shape.window,
        layer_types=layer_types(shape, layers),
        attention_k_eq_v=shape.k_eq_v,
        use_double_wide_mlp=shape.double_wide_mlp,
        final_logit_softcapping=30.0,
        **moe,
    )


def drafter_config(shape: Shape, vocab: int) -> dict:
    """A drafter config.json as the real assistants write it (4 layers, all KV-shared)."""
    text = dict(
        model_type="gemma4_text",
        vocab_size=vocab,
        hidden_size=shape.draft_hidden,
        intermediate_size=shape.draft_intermediate,
        num_hidden_layers=4,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=256,
        global_head_dim=512,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        sliding_window=shape.window,
        attention_k_eq_v=shape.k_eq_v,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=4,
    )
    if shape.global_kv_heads:
        text["num_global_key_value_heads"] = shape.global_kv_heads
    config = dict(model_type="gemma4_assistant", backbone_hidden_size=shape.hidden, text_config=text)
    if shape.centroid_head:
        centroids = max(1, vocab // TOKENS_PER_CENTROID)
        config.update(use_ordered_embeddings=True, num_centroids=centroids,
                      centroid_intermediate_top_k=min(CENTROID_TOP_K, centroids))
    return config


def random_pair(name: str, layers: int, vocab: int, experts: Optional[int] = None, seed: int = 0,
                dtype: mx.Dtype = mx.float32) -> Pair:
    """A random target with `name`'s per-layer shapes and its real-shaped random drafter, in `dtype`
    (float32 on CPUs, see measuring.md; bfloat16 is what GPUs and Macs run)."""
    from mlx_lm.models import gemma4_text

    from .drafter import Drafter, DrafterArgs

    shape = SHAPES[name]
    if shape.centroid_head and vocab % TOKENS_PER_CENTROID:
        raise ValueError(f"--vocab must be a multiple of {TOKENS_PER_CENTROID} for {name}'s centroid head")
    mx.random.seed(seed)
    target = gemma4_text.Model(target_args(shape, layers, vocab, experts))
    target.set_dtype(dtype)
    mx.eval(target.parameters())
    drafter = Drafter(DrafterArgs.from_dict(drafter_config(shape, vocab)))
    if shape.centroid_head:
        drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    drafter.set_dtype(dtype)
    mx.eval(drafter.parameters())
    drafter.eval()
    return Pair(target, drafter)


def weight_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def word_tokenizer(vocab: int):
    """A tokenizer whose ids are the words w0..w{vocab-1}: mlx-lm needs one to stream."""
    import json
    import tempfile
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(tempfile.mkdtemp(prefix="gemma-mtp-bench-"))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    special = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "w0", "eos_token": "w1", "bos_token": "w2"}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))
    return load_tokenizer(folder)


# --- injected acceptance ---------------------------------------------------------------------


@dataclass
class InjectedAcceptance:
    """A `draft_filter` that makes draft j right with conditional probability profile[j].

    Draft j is replaced by the target's greedy token at its position (from a plain run done
    beforehand) when a seeded draw says so, and otherwise by a token guaranteed to differ. Draws
    are keyed by (seed, the draft's own position): a position is drafted at most once per run
    (after a rejection the target's token takes it), so the draws stay independent, and every
    setting sees the same draw at the same position (common random numbers: settings differ by
    their costs and K, not by luck).
    The drafter's own tokens stay in the graph (`where` reads them), so it runs at full cost.
    A profile shorter than K repeats its last value."""

    continuation: list  # the target's greedy output, starting at absolute position prompt_len
    prompt_len: int
    profile: list
    vocab: int
    seed: int = 0

    def right_tokens(self, position: int, k: int) -> list:
        start = position + 1 - self.prompt_len
        return [self.continuation[min(start + j, len(self.continuation) - 1)] for j in range(k)]

    def keep(self, position: int, k: int) -> list:
        """Per draft j of a round after `position`: does it match the target's token?"""
        draws = [np.random.default_rng([self.seed, position + 1 + j]).random() for j in range(k)]
        return [bool(u < self.profile[min(j, len(self.profile) - 1)]) for j, u in enumerate(draws)]

    def __call__(self, drafts: mx.array, position: int) -> mx.array:
        k = drafts.shape[1]
        right = mx.array([self.right_tokens(position, k)], mx.int32)
        wrong = (right + 1) % self.vocab
        own = mx.where(drafts == right, wrong, drafts)
        return mx.where(mx.array([self.keep(position, k)]), right, own)


def parse_profile(text: str) -> list:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ValueError(f"acceptance profile must be comma-separated probabilities in [0, 1], got {text!r}")
    return values


def conditional_acceptance(round_log: list, max_k: int) -> list:
    """Per position: accepted / reached, where reached means every earlier draft was accepted."""
    reached, accepted = [0] * max_k, [0] * max_k
    for drafts, n in round_log:
        for j in range(min(len(drafts), max_k)):
            reached[j] += 1
            if j >= n:
                break
            accepted[j] += 1
    return [a / r if r else None for a, r in zip(accepted, reached)]


# --- timed runs ------------------------------------------------------------------------------


@dataclass
class Run:
    tokens: list
    ttft: float  # seconds from the call to the first token
    decode_seconds: float  # first token to last
    peak_memory_bytes: int
    stats: Optional[Stats] = None

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def timed(stream) -> tuple:
    start = time.perf_counter()
    tokens, first = [], None
    for t in stream:
        if first is None:
            first = time.perf_counter()
        tokens.append(t)
    end = time.perf_counter()
    return tokens, (first or end) - start, end - (first or end)


def fresh_memory() -> None:
    mx.clear_cache()
    mx.reset_peak_memory()


def run_ours(pair: Pair, prompt: list, max_tokens: int, policy, draft_filter=None) -> Run:
    fresh_memory()
    stats = Stats()
    stream = generate_tokens(pair, prompt, max_tokens, policy, (), stats, Sampling(seed=0), draft_filter=draft_filter)
    tokens, ttft, seconds = timed(t for t, _ in stream)
    return Run(tokens, ttft, seconds, mx.get_peak_memory(), stats)


def run_mlx_lm(pair: Pair, tokenizer, prompt: list, max_tokens: int) -> Run:
    from mlx_lm import stream_generate

    fresh_memory()
    stream = stream_generate(pair.target, tokenizer, mx.array(prompt, mx.uint32), max_tokens=max_tokens)
    tokens, ttft, seconds = timed(r.token for r in stream)
    return Run(tokens, ttft, seconds, mx.get_peak_memory())


# --- the cost of a round's parts -------------------------------------------------------------


def median_time(fn: Callable, repeats: int) -> float:
    fn()  # warm-up: allocation, first-use costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class StepCosts:
    plain: float  # one target token, argmax included
    verify: dict  # k -> seconds for verifying k + 1 tokens
    draft: dict  # k -> seconds for a k-step draft block, as the loop runs it
    draft_eager: dict = field(default_factory=dict)  # ... without mx.compile, for comparison

    def round(self, k: int) -> float:
        return self.plain if k == 0 else self.verify[k] + self.draft[k]


def measure_steps(pair: Pair, context: list, ks: list, repeats: int = 3) -> StepCosts:
    """Time draft-only and verify-only graphs of the rounds' shapes on a cache holding `context`."""
    view = pair.view
    cache = view.make_cache(CACHE_SLACK)
    hidden = prefill(view, mx.array(context[:-1], mx.uint32), cache)
    token = mx.array([[context[-1]]], mx.int32)
    mx.eval(hidden, [c.state for c in cache])

    def verify(n):
        tokens = mx.concatenate([token] * n, axis=1)
        mx.eval(mx.argmax(view.logits(view.hidden(tokens, cache)), axis=-1))
        for c in cache:
            c.trim(n)

    def draft(k):
        drafts, _ = draft_block(pair, token, hidden, cache, k, Sampling(seed=0), None)
        mx.eval(drafts)

    def draft_times():
        return {k: median_time(lambda: draft(k), repeats) for k in ks} if pair.drafter is not None else {}

    plain = median_time(lambda: verify(1), repeats)
    verify_times = {k: median_time(lambda: verify(k + 1), repeats) for k in ks}
    loop_draft = draft_times()
    compiled, pair.compile_draft = pair.compile_draft, False
    try:
        eager_draft = draft_times() if compiled else loop_draft
    finally:
        pair.compile_draft = compiled
    return StepCosts(plain, verify_times, loop_draft, eager_draft)


def median_steps(runs: list) -> StepCosts:
    def med(values):
        return statistics.median(values)

    return StepCosts(
        med([r.plain for r in runs]),
        {k: med([r.verify[k] for r in runs]) for k in runs[0].verify},
        {k: med([r.draft[k] for r in runs]) for k in runs[0].draft},
        {k: med([r.draft_eager[k] for r in runs]) for k in runs[0].draft_eager},
    )


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class BenchOptions:
    tokens: int = 64
    repeats: int = 3
    ks: list = field(default_factory=lambda: list(range(1, 9)))
    adaptive: bool = True
    mlx_lm: bool = True
    inject: Optional[list] = None
    seed: int = 0
    step_repeats: int = 3


def device_description() -> str:
    """What MLX computes on: "cpu" or "gpu (its name)"."""
    device = mx.default_device()
    name = mx.device_info().get("device_name", "") if hasattr(mx, "device_info") else ""
    return f"{device.type.name}" + (f" ({name})" if name and device.type == mx.gpu else "")


def openblas_loaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def setting_name(k) -> str:
    return "plain" if k == 0 else f"K={k}"


def paired_ratio(rates: list, base_rates: list) -> float:
    """Median over repeats of rate / base rate in the same repeat: the machine's drift between
    repeats cancels in each pair."""
    return statistics.median(r / b for r, b in zip(rates, base_rates) if b)


def summarize(runs: list) -> dict:
    """Median decode rate and TTFT over repeats, summed over prompts per repeat."""
    rates, ttfts = [], []
    for per_prompt in runs:
        tokens = sum(len(r.tokens) - 1 for r in per_prompt)
        seconds = sum(r.decode_seconds for r in per_prompt)
        rates.append(tokens / seconds if seconds else 0.0)
        ttfts.append(statistics.mean(r.ttft for r in per_prompt))
    return {
        "tokens_per_second": statistics.median(rates),
        "all_tokens_per_second": rates,
        "ttft_seconds": statistics.median(ttfts),
        "peak_memory_bytes": max(r.peak_memory_bytes for per_prompt in runs for r in per_prompt),
    }


def mtp_entry(k, runs: list, plain: dict, steps: StepCosts, drafter_bytes: int, plain_tokens: list, opts) -> dict:
    entry = {"num_draft_tokens": k if k != "adaptive" else "adaptive", **summarize(runs)}
    entry["acceptance_injected"] = opts.inject is not None
    entry["speedup"] = paired_ratio(entry["all_tokens_per_second"], plain["all_tokens_per_second"])
    entry["ttft_over_plain"] = entry["ttft_seconds"] / plain["ttft_seconds"]
    entry["peak_over_plain_plus_drafter"] = entry["peak_memory_bytes"] / (plain["peak_memory_bytes"] + drafter_bytes)
    all_stats = [r.stats for per_prompt in runs for r in per_prompt]
    max_k = max(opts.ks + [8])
    drafted = [0] * max_k
    accepted = [0] * max_k
    log, rounds, generated, round_seconds, ks_used = [], 0, 0, [], []
    for s in all_stats:
        for j, (d, a) in enumerate(zip(s.drafted_per_position[:max_k], s.accepted_per_position[:max_k])):
            drafted[j] += d
            accepted[j] += a
        log += s.round_log
        rounds += s.rounds
        generated += s.generated_tokens - 1
        round_seconds += s.round_seconds[1:]  # the first round also carries the first token's handoff
        # K of every round: drafting rounds are in round_log, plain ones (K = 0) are not
        ks_used += [len(d) for d, _ in s.round_log] + [0] * (s.rounds - len(s.round_log))
    entry["acceptance_per_position"] = [a / d if d else None for a, d in zip(accepted, drafted)]
    entry["conditional_acceptance_per_position"] = conditional_acceptance(log, max_k)
    entry["rounds"] = rounds
    entry["tokens_per_round"] = generated / rounds if rounds else 0.0
    entry["accepted_per_round"] = entry["tokens_per_round"] - 1
    entry["k_histogram"] = {str(n): ks_used.count(n) for n in sorted(set(ks_used))}
    ideal_time = sum(steps.round(n) for n in ks_used)
    entry["ideal_speedup"] = generated * steps.plain / ideal_time if ideal_time else None
    entry["measured_over_ideal"] = entry["speedup"] / entry["ideal_speedup"] if entry["ideal_speedup"] else None
    mean_round = statistics.mean(round_seconds) if round_seconds else None
    parts_draft = statistics.mean(steps.draft.get(n, 0.0) for n in ks_used) if ks_used else 0.0
    parts_verify = statistics.mean(steps.round(n) - steps.draft.get(n, 0.0) for n in ks_used) if ks_used else 0.0
    entry["cost_split"] = {
        "round_seconds": mean_round,
        "draft_seconds": parts_draft,
        "verify_seconds": parts_verify,
        "host_seconds": None if mean_round is None else mean_round - parts_draft - parts_verify,
    }
    entry["matches_plain"] = all(r.tokens == p for per_prompt in runs for r, p in zip(per_prompt, plain_tokens))
    return entry


def bench(pair: Pair, tokenizer, prompts: list, opts: BenchOptions, log=print) -> dict:
    """Run every setting on every prompt, interleaved over `opts.repeats`; return the report."""
    if pair.drafter is None:
        raise ValueError("the bench needs a pair with a drafter")
    vocab = pair.view.args.vocab_size
    settings = [0] + list(opts.ks) + (["adaptive"] if opts.adaptive else [])
    max_k = max(opts.ks) if opts.ks else 8

    # the plain path's output: what every MTP run must reproduce, and the injected drafts' source
    extra = max(opts.ks + [8]) + 2
    continuations = [run_ours(pair, p, opts.tokens + extra, 0).tokens for p in prompts]
    plain_tokens = [c[: opts.tokens] for c in continuations]
    filters = [
        InjectedAcceptance(c, len(p), opts.inject, vocab, opts.seed + i) if opts.inject is not None else None
        for i, (p, c) in enumerate(zip(prompts, continuations))
    ]

    # one controller for every adaptive run, as the API keeps one per loaded pair: the repeats
    # measure it after what it learnt in the earlier runs (the warm-up included)
    adaptive = AdaptiveDraft(max_k=max_k)

    def policy(k):
        return adaptive if k == "adaptive" else k

    # every K up to the largest: the adaptive policy and the last rounds of a run use them too
    context = prompts[0] + continuations[0][: opts.tokens // 2]
    step_runs = []

    def time_steps():
        # timed once per repeat, between the runs, so a busy machine skews parts and runs alike
        step_runs.append(measure_steps(pair, context, list(range(1, max_k + 1)), opts.step_repeats))

    # warm-up: one short run of each setting
    for k in settings:
        run_ours(pair, prompts[0], min(4, opts.tokens), policy(k), filters[0])
    if opts.mlx_lm:
        run_mlx_lm(pair, tokenizer, prompts[0], min(4, opts.tokens))

    runs = {k: [] for k in settings}
    runs["mlx_lm"] = []
    for rep in range(opts.repeats):
        time_steps()
        for k in settings:
            runs[k].append([run_ours(pair, p, opts.tokens, policy(k), f) for p, f in zip(prompts, filters)])
        if opts.mlx_lm:
            runs["mlx_lm"].append([run_mlx_lm(pair, tokenizer, p, opts.tokens) for p in prompts])
        log(f"repeat {rep + 1}/{opts.repeats}: plain {summarize(runs[0][-1:])['tokens_per_second']:.2f} tok/s")

    steps = median_steps(step_runs)
    plain = summarize(runs[0])
    drafter_bytes = weight_bytes(pair.drafter)
    report = {
        "acceptance_injected": opts.inject is not None,
        "injected_profile": opts.inject,
        "tokens": opts.tokens,
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "repeats": opts.repeats,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "device": device_description(),
        "openblas_preloaded": openblas_loaded(),
        "target_weight_bytes": weight_bytes(pair.target),
        "drafter_weight_bytes": drafter_bytes,
        "plain_tokens_per_second": plain["tokens_per_second"],
        "plain_ttft_seconds": plain["ttft_seconds"],
        "plain_peak_memory_bytes": plain["peak_memory_bytes"],
        "plain_all_tokens_per_second": plain["all_tokens_per_second"],
        "step_seconds": {
            "plain": steps.plain,
            "verify_k_plus_1": {str(k): v for k, v in steps.verify.items()},
            "draft_block_k": {str(k): v for k, v in steps.draft.items()},
            "draft_block_k_eager": {str(k): v for k, v in steps.draft_eager.items()},
        },
        "draft_compiled": pair.compile_draft,
    }
    if opts.mlx_lm:
        theirs = summarize(runs["mlx_lm"])
        report.update(
            mlx_lm_tokens_per_second=theirs["tokens_per_second"],
            mlx_lm_ttft_seconds=theirs["ttft_seconds"],
            mlx_lm_peak_memory_bytes=theirs["peak_memory_bytes"],
            mlx_lm_all_tokens_per_second=theirs["all_tokens_per_second"],
            plain_over_mlx_lm=paired_ratio(plain["all_tokens_per_second"], theirs["all_tokens_per_second"]),
            mlx_lm_matches_plain=all(r.tokens == p for rr in runs["mlx_lm"] for r, p in zip(rr, plain_tokens)),
        )
    else:
        report["mlx_lm_tokens_per_second"] = None
    report["mtp"] = [
        mtp_entry(k, runs[k], plain, steps, drafter_bytes, plain_tokens, opts) for k in settings if k != 0
    ]
    return report


# --- reporting -------------------------------------------------------------------------------


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


def preload_openblas(argv: list, env: dict = os.environ, log=lambda m: print(m, file=sys.stderr),
                     command: str = "bench") -> None:
    """On Linux, re-exec this process with OpenBLAS preloaded (MLX's CPU wheel bundles the slow
    reference BLAS, see measuring.md); warn when it is not installed. A GPU build needs neither."""
    if platform.system() != "Linux" or openblas_loaded() or env.get(REEXEC_MARK):
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
