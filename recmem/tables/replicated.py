"""Replicated tables: a whole table on every worker, each replica trained on the global batch.

Kinds whose rows are shared between IDs (``qr``'s quotient and remainder rows, ``multihash``'s
hashed rows, ``mixed_dim``'s narrow tables behind a projection) can be split neither by row nor by
ID, and they are small by design: they are the tables meant to fit in one worker's memory. Each
worker therefore holds all of the table, and the replicas stay identical because every one of them
takes the same step, computed from the global batch. One training step on W workers, each holding a
local batch of b rows::

    forward:  local KJT --table (no grad)--> [b, F, D]          and  all-gather the W local KJTs
    backward: all-gather the W gradients [b, F, D] --> [W * b, F, D] / W
              --table on the global KJT, backward--> the fused row optimizer steps, the table's
              dense parameters (projections) get the global batch's gradient

Each worker's loss is a mean over its own b rows, so the global batch's gradient is the mean of
the workers' (the division by W, as DDP does for dense layers): each replica then updates exactly
as the single-process table would on the global batch. Replicas start equal (rank 0's parameters
and buffers are broadcast at construction) and the table's dense parameters stay out of DDP: their
gradient is already the global one on every worker.

The price: every worker runs the table's backward over the global batch (W times its own share)
and two all-gathers per step (IDs forward, pooled gradients backward). A kind that draws random
numbers in its training forward (``optembed``'s supernet widths) cannot be replicated this way: the
recomputation would draw other numbers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.tables.base import HasPlan, ServingForm


class ReplicatedTable(torch.nn.Module):
    """``table`` replicated over the workers of ``group`` (see the module docstring).

    Every worker must call forward (and backward) the same number of times, in the same order, in
    training mode: the gathers are collective. Evaluation (``eval()`` or no grad) is a local lookup.

    Args:
        table: the whole table, built alike on every worker (an ``EmbeddingTable``).
        group: the process group of the gathers (a gloo group on CPU).
    """

    def __init__(self, table: torch.nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.table = table
        self.feature_names = list(table.feature_names)
        self.embedding_dim = table.embedding_dim
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.layout = {f: "replicated" for f in self.feature_names}
        self._sent_bytes = 0
        self._steps = 0
        self._anchor = torch.zeros((), requires_grad=True)  # gives the output a grad_fn
        with torch.no_grad():  # replicas start equal, whatever each process's random state
            for tensor in [*table.parameters(), *table.buffers()]:
                dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` (local batch b) -> [b, F, D] pooled embeddings."""
        if not (torch.is_grad_enabled() and self.training):
            return self.table(features)
        with torch.no_grad():
            local = self.table(features)
        everyone = _gather_features(features, self.group)
        self._sent_bytes += everyone.values().numel() * 8 + everyone.lengths().numel() * 8
        self._steps += 1
        return _GlobalStep.apply(local, self._anchor, self, everyone)

    def _global_backward(self, grad: torch.Tensor, everyone: KeyedJaggedTensor) -> None:
        """Run the table's backward for the global batch (``grad``: this worker's [b, F, D])."""
        grads, _ = _gather_rows(grad.contiguous(), self.group)  # [W * b, F, D]
        self._sent_bytes += grads.numel() * grads.element_size()
        with torch.enable_grad():
            pooled = self.table(everyone)
            pooled.backward(grads / self.world_size)

    def to_serving(self) -> list[ServingForm]:
        """The table's serving forms (every replica holds the same)."""
        return self.table.to_serving()

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """The table's own dense parameters (kept equal on every worker by the global step)."""
        return self.table.dense_parameters() if hasattr(self.table, "dense_parameters") else []

    def plan(self) -> dict[str, str]:
        """The table's layout chosen at build time (``base.HasPlan``; empty for kinds without one)."""
        return self.table.plan() if isinstance(self.table, HasPlan) else {}

    def memory_bytes(self) -> int:
        """Bytes of this worker's replica."""
        return self.table.memory_bytes()

    def stats(self) -> dict[str, float]:
        """The table's stats, plus the bytes this worker sent per training step."""
        per_step = self._sent_bytes / max(self._steps, 1)
        return {**self.table.stats(), "replicated_gather_bytes_per_step": float(per_step)}


class _GlobalStep(torch.autograd.Function):
    """Identity on the local rows; backward trains the replica on the global batch."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, anchor: torch.Tensor, owner: ReplicatedTable,
                everyone: KeyedJaggedTensor) -> torch.Tensor:
        ctx.owner, ctx.everyone = owner, everyone
        return local.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.owner._global_backward(grad, ctx.everyone)
        return None, None, None, None


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every worker's ``x`` along dim 0 (their first dims may differ); also each
    worker's first dim."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]), group=group)
    counts = [int(n) for n in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


def _gather_features(features: KeyedJaggedTensor, group: dist.ProcessGroup) -> KeyedJaggedTensor:
    """The KJT of the global batch: every worker's bags, rank after rank, within each key."""
    keys, batch = features.keys(), features.stride()
    lengths = features.lengths().view(len(keys), batch)  # [F, b]
    all_lengths, strides = _gather_rows(lengths.t().contiguous(), group)  # [W * b, F], each worker's b
    all_values, _ = _gather_rows(features.values(), group)
    # Within each worker's values the keys come one after another; reorder to key-major. A worker's
    # values per key are the sums of its lengths.
    per_worker = [part.sum(0).tolist() for part in torch.split(all_lengths, strides)]  # [W][F]
    pieces, start = [[] for _ in keys], 0
    for counts in per_worker:
        for k, n in enumerate(counts):
            pieces[k].append(all_values[start : start + n])
            start += n
    ordered = torch.cat([torch.cat(p) for p in pieces]) if keys else all_values
    return KeyedJaggedTensor(keys=keys, values=ordered, lengths=all_lengths.t().flatten(), stride=sum(strides))
