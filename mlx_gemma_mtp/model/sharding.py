"""Tensor parallelism: the Gemma 4 target split over the group `mlx.launch` set up.

Every rank holds a slice of every layer and runs the whole round: the same drafts, the same
verification, the same acceptance and sampled tokens (the draws are keyed by seed and position,
and the all-sums give every rank the same sums), so ranks never exchange tokens. Per layer:

- attention: q_proj split by heads (all-to-sharded), o_proj sharded-to-all (one all-sum);
  k_proj/v_proj cut to the KV heads this rank's query heads read. With fewer KV heads than ranks
  (the E2B's one, the 26B/31B full layers' few) ranks share a KV head: each keeps a copy of it.
- MLP: gate/up all-to-sharded, down sharded-to-all (one all-sum); the 26B-A4B's experts are split
  the same way inside every expert (each rank holds every expert's slice of the intermediate
  dimension, so routing stays local) and summed once after the weighted sum of the top-k.
- the per-layer input embedding of the E2B/E4B (vocabulary x layers x 256: the bulk of their
  weights) is split by vocabulary rows: each rank looks up the tokens it holds, one all-sum.
- replicated: the token embedding and tied LM head (the drafter reads them inside its compiled
  step), norms, the router, the per-layer gates, and the drafter.

The drafter attends to every KV head of the two producer layers (the last full and the last
sliding layer that write K/V). Those two layers keep their whole k_proj/v_proj, so their caches
hold every head without any communication; their attention reads its rank's heads through
`LocalHeads`. That costs two layers' K/V projections computed in full and their caches at full
width on every rank, and no bytes on the wire.

A single process never calls into this module: `launched_group()` is None unless a launcher
started this process, so nothing changes there.
"""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_map

from mlx_gemma_mtp.runtime.adaptive import AdaptivePolicies
from mlx_gemma_mtp.errors import MTPError

# environment variables a launcher sets in every process it starts (mlx.launch: ring, jaccl and
# nccl set MLX_RANK; mpirun sets OMPI_COMM_WORLD_SIZE)
LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process."""
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


def launched_group() -> Optional[mx.distributed.Group]:
    """The group mlx.launch (or mpirun) set up, when it has more than one process; else None.
    A process nobody launched never initializes a backend."""
    if not launched():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def is_writer(group: Optional[mx.distributed.Group]) -> bool:
    """Whether this process writes the output (rank 0, or a single process)."""
    return group is None or group.rank() == 0


def kv_heads(n_kv: int, size: int, rank: int) -> tuple:
    """[start, stop) of the KV heads `rank` keeps: an equal share, or, with fewer KV heads than
    ranks, the one KV head its query heads read."""
    if n_kv % size == 0:
        share = n_kv // size
        return rank * share, (rank + 1) * share
    if size % n_kv == 0:
        head = rank * n_kv // size
        return head, head + 1
    raise MTPError(f"cannot split {n_kv} KV heads over {size} processes (use a number of processes that "
                   f"divides the KV heads or that they divide)")


def producer_layers(args) -> dict:
    """layer index -> layer type of the layers whose K/V the drafter (and KV-shared layers) read."""
    first_shared = args.num_hidden_layers - args.num_kv_shared_layers
    last = {kind: i for i, kind in enumerate(args.layer_types[:first_shared])}
    return {i: kind for kind, i in last.items()}


def _keep_rows(module: nn.Module, start: int, stop: int) -> None:
    """Keep output rows [start, stop) of a linear layer (plain or quantized)."""
    module.update(tree_map(lambda p: mx.contiguous(p[start:stop]), module.parameters()))


class SummedExperts(nn.Module):
    """mlx-lm's Gemma 4 experts with each expert's intermediate dimension split: the partial
    outputs are summed over the group (the same parameter names, `switch_glu.*`)."""

    def __init__(self, experts: nn.Module, group):
        super().__init__()
        self.switch_glu = experts.switch_glu
        self.group = group

    def __call__(self, x, top_k_indices, top_k_weights):
        y = (mx.expand_dims(top_k_weights, -1) * self.switch_glu(x, top_k_indices)).sum(-2)
        return mx.distributed.all_sum(y, group=self.group)


class VocabShardedEmbedding(nn.Module):
    """An embedding (plain or quantized) holding rows [start, start + rows) of the vocabulary:
    tokens outside give zeros, and the all-sum gives every rank every token's row."""

    def __init__(self, embedding: nn.Module, start: int, rows: int, group):
        super().__init__()
        self.table = embedding
        self.start, self.rows, self.group = start, rows, group

    def __call__(self, ids):
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = self.table(mx.where(inside, local, 0))
        return mx.distributed.all_sum(out * inside[..., None].astype(out.dtype), group=self.group)


def shard_target(model: nn.Module, group) -> dict:
    """Split mlx-lm's Gemma 4 model in place over `group` (before its weights are evaluated, so
    each rank reads only its slices into memory). Returns {producer layer index: (first KV head,
    last + 1)} of this rank, what `LocalHeads` needs."""
    text = getattr(model, "language_model", model)
    args = text.args
    size, rank = group.size(), group.rank()
    producers = producer_layers(args)
    local = {}
    for i, layer in enumerate(text.model.layers):
        attn = layer.self_attn
        if attn.n_heads % size:
            raise MTPError(f"cannot split {attn.n_heads} attention heads over {size} processes")
        if attn.has_kv:
            lo, hi = kv_heads(attn.n_kv_heads, size, rank)
            if i in producers:
                local[i] = (lo, hi)  # whole K/V for the drafter; attention reads [lo, hi)
            else:
                for name in ("k_proj", "v_proj"):
                    if name in attn:
                        _keep_rows(attn[name], lo * attn.head_dim, hi * attn.head_dim)
                attn.n_kv_heads = hi - lo
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= size
        layer.mlp.gate_proj = shard_linear(layer.mlp.gate_proj, "all-to-sharded", group=group)
        layer.mlp.up_proj = shard_linear(layer.mlp.up_proj, "all-to-sharded", group=group)
        layer.mlp.down_proj = shard_linear(layer.mlp.down_proj, "sharded-to-all", group=group)
        if layer.enable_moe:
            glu = layer.experts.switch_glu
            shard_inplace(glu.gate_proj, "all-to-sharded", group=group)
            shard_inplace(glu.up_proj, "all-to-sharded", group=group)
            shard_inplace(glu.down_proj, "sharded-to-all", group=group)
            layer.experts = SummedExperts(layer.experts, group)
    ple = text.model.embed_tokens_per_layer
    if ple is not None:
        vocab = args.vocab_size_per_layer_input
        rows = -(-vocab // size)
        start = rank * rows
        _keep_rows(ple, start, min(vocab, start + rows))
        text.model.embed_tokens_per_layer = VocabShardedEmbedding(ple, start, rows, group)
    return local


class LocalHeads:
    """A producer layer's cache as its sharded attention sees it: the cache stores every KV head
    (the drafter reads them all), the attention gets heads [lo, hi)."""

    def __init__(self, cache, lo: int, hi: int):
        self._cache, self._lo, self._hi = cache, lo, hi

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def update_and_fetch(self, keys, values):
        keys, values = self._cache.update_and_fetch(keys, values)
        cut = lambda x: x[:, self._lo : self._hi]  # noqa: E731
        return tree_map(cut, keys), tree_map(cut, values)


class AgreedDraft:
    """A draft-length policy that learns from rank 0's round times on every rank. Every rank runs
    the same rounds, so its policy is told the same K and acceptance (the all-sums make the rounds
    agree); told rank 0's seconds too, in the same order, a deterministic policy chooses the same K
    on every rank whatever each rank's clock says. The seconds are summed over the group in an
    all-sum queued after the round and read one round later (by then it is done), so no rank waits
    for it. The same all-sum carries each rank's K and row count: ranks out of step stop with an
    error instead of going on with rounds of different shapes."""

    def __init__(self, policy, group):
        self.policy, self.group = policy, group
        self._pending = None  # (k, accepted, rows, the all-sum of [rank 0's seconds, K, rows])

    def choose(self, max_k: int) -> int:
        return self.policy.choose(max_k)

    def observe(self, k: int, accepted, seconds) -> None:
        rows = len(accepted) if isinstance(accepted, (list, tuple)) else 1
        mine = seconds if self.group.rank() == 0 and seconds else 0.0
        summed = mx.distributed.all_sum(mx.array([mine, k, rows], mx.float32), group=self.group)
        mx.async_eval(summed)
        if self._pending is not None:
            self._deliver(*self._pending)
        self._pending = (k, accepted, rows, summed)

    def _deliver(self, k: int, accepted, rows: int, summed: mx.array) -> None:
        seconds, ks, all_rows = summed.tolist()
        size = self.group.size()
        if ks != size * k or all_rows != size * rows:
            raise MTPError(f"the processes are out of step: rank {self.group.rank()} drafted {k} tokens for "
                           f"{rows} rows, the group's sums are {ks:g} and {all_rows:g} over {size} processes")
        self.policy.observe(k, accepted, seconds if seconds > 0 else None)


def agreed_policies(group) -> AdaptivePolicies:
    """Pair.adaptive on a rank: the per-batch-size adaptive policies, each wrapped in `AgreedDraft`
    as it is made (a new batch size's too), so they choose the same K on every rank."""
    return AdaptivePolicies(wrap=lambda policy: AgreedDraft(policy, group))


def attach(pair, group, local_heads: dict) -> None:
    """Make a loaded pair's round the same on every rank: producer caches read through
    `LocalHeads`, adaptive K agreed."""
    def forward_cache(cache: list) -> list:
        return [LocalHeads(c, *local_heads[i]) if i in local_heads else c for i, c in enumerate(cache)]

    pair.view.forward_cache = forward_cache
    pair.adaptive = agreed_policies(group)
    pair.group = group


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters (what a rank holds of it)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
