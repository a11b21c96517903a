"""Bytes one worker sends per training step, measured as the collectives are called
(``ray.measure_traffic``).

A worker's traffic is of two kinds (see ``plan.py``):

- **table exchanges**, on the tables' own gloo group: TorchRec's DMP (IDs to their rows' owners by
  all-to-all; pooled rows back by all-to-all when table-wise, by reduce-scatter when row-wise; their
  gradients by the reverse: all-to-all or all-gather) and the ID-sharded tables' all-to-alls. All are
  Python ``torch.distributed`` calls, which the meter wraps while it is open.
- **DDP's all-reduce** of the dense gradients. DDP's C++ reducer calls the process group itself, so no
  Python wrapper sees it; a DDP communication hook counts each gradient bucket, then runs the default
  all-reduce (``allreduce_hook``: the same mean as without a hook).

What the numbers mean:

- table collectives count the bytes **sent to other ranks**: the part of the input that leaves this
  worker; its own split stays in memory (as ``ShardedTable._count_traffic`` counts it).
  ``all_to_all_single``: the input minus this rank's split; ``reduce_scatter``: the other ranks' parts,
  (W - 1) / W of the input; ``all_gather``: the input once per other rank, (W - 1) x input. For
  reduce-scatter and all-gather that is what both a direct exchange and a ring send.
- the all-reduce counts its **payload**: the gradient bytes in DDP's buckets (4 B x every dense
  parameter in fp32), whatever the algorithm. A ring (or halving-doubling) all-reduce sends
  2 (W - 1) / W x payload per worker.

Only training steps count: a collective is counted while the model is in training mode (evaluation
passes are not), and a step is one forward of the model in training mode. Collectives on other groups
(the metrics' all-gather, Ray's own) are not table traffic and are not counted. Callers that bypass
``torch.distributed.<name>`` (e.g. ``distributed_c10d`` imported directly) would not be seen; TorchRec
and ``recmem.tables.sharded`` go through it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from recmem.models import CTRModel

Sent = Callable[[dict[str, Any], int, int], int]
"""(bound arguments of the call, rank in its group, group size) -> bytes sent to other ranks."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_to_all_single(a: dict[str, Any], rank: int, world: int) -> int:
    x = a["input"]
    splits = a.get("input_split_sizes") or [x.shape[0] // world] * world  # None: equal parts of dim 0
    row_bytes = _nbytes(x) // max(x.shape[0], 1)
    return _nbytes(x) - splits[rank] * row_bytes


def _reduce_scatter_tensor(a: dict[str, Any], rank: int, world: int) -> int:
    return _nbytes(a["input"]) * (world - 1) // world


def _reduce_scatter(a: dict[str, Any], rank: int, world: int) -> int:
    return sum(_nbytes(t) for r, t in enumerate(a["input_list"]) if r != rank)


def _all_gather_into_tensor(a: dict[str, Any], rank: int, world: int) -> int:
    return (world - 1) * _nbytes(a["input_tensor"])


def _all_gather(a: dict[str, Any], rank: int, world: int) -> int:
    return (world - 1) * _nbytes(a["tensor"])


# torch.distributed function -> (metric kind, bytes it sends); the collectives TorchRec's comm_ops and
# dist_data and recmem's sharded tables call for embedding exchanges.
COLLECTIVES: dict[str, tuple[str, Sent]] = {
    "all_to_all_single": ("all_to_all", _all_to_all_single),
    "reduce_scatter_tensor": ("reduce_scatter", _reduce_scatter_tensor),
    "reduce_scatter": ("reduce_scatter", _reduce_scatter),
    "all_gather_into_tensor": ("all_gather", _all_gather_into_tensor),
    "all_gather": ("all_gather", _all_gather),
}
TABLE_KINDS = ("all_to_all", "reduce_scatter", "all_gather")


class TrafficMeter:
    """Counts the bytes this worker sends per training step while open (a context manager).

    Opening wraps the table collectives of ``torch.distributed`` (restored on close) and, once per
    model, registers a counting DDP communication hook on ``model.dense`` (DDP cannot drop a hook; after
    close it only runs the default all-reduce). Table groups are the ``group`` attributes of
    ``model.tables.tables`` (``ShardedTable``, ``DmpTables``). On one worker (no DDP, no groups) every
    number is 0.

    Args:
        model: this worker's model (``build_worker_model``); forward and backward run inside the
            ``with`` block.
    """

    def __init__(self, model: CTRModel) -> None:
        self.model = model
        self.groups = [t.group for t in model.tables.tables
                       if isinstance(getattr(t, "group", None), dist.ProcessGroup)]
        self.ddp = model.dense if isinstance(model.dense, DistributedDataParallel) else None
        self._bytes = {kind: 0 for kind in (*TABLE_KINDS, "allreduce_payload")}
        self._steps = 0
        self._open = False
        self._originals: dict[str, Callable] = {}
        self._step_hook: torch.utils.hooks.RemovableHandle | None = None
        self._hooked = False

    def __enter__(self) -> "TrafficMeter":
        for name, (kind, sent) in COLLECTIVES.items():
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._counted(self._originals[name], kind, sent))
        self._step_hook = self.model.register_forward_pre_hook(self._on_forward)
        if self.ddp is not None and not self._hooked:
            self.ddp.register_comm_hook(self, TrafficMeter._count_allreduce)
            self._hooked = True
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = False
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
        if self._step_hook is not None:
            self._step_hook.remove()

    def stats(self) -> dict[str, float]:
        """Bytes per training step since the last call, as metrics; empty when no step was trained.

        Keys: ``traffic/<kind>_sent_bytes_per_step`` for ``all_to_all``, ``reduce_scatter``,
        ``all_gather`` and their sum ``tables``; ``traffic/allreduce_payload_bytes_per_step``.
        """
        steps = self._steps
        counted = dict(self._bytes)
        self._bytes = dict.fromkeys(self._bytes, 0)
        self._steps = 0
        if not steps:
            return {}
        out = {f"traffic/{kind}_sent_bytes_per_step": counted[kind] / steps for kind in TABLE_KINDS}
        out["traffic/tables_sent_bytes_per_step"] = sum(counted[k] for k in TABLE_KINDS) / steps
        out["traffic/allreduce_payload_bytes_per_step"] = counted["allreduce_payload"] / steps
        return out

    def _counted(self, original: Callable, kind: str, sent: Sent) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            group = arguments.get("group")
            if self._open and self.model.training and any(group is g for g in self.groups):
                self._bytes[kind] += sent(arguments, dist.get_rank(group), dist.get_world_size(group))
            return original(*args, **kwargs)

        return counted

    def _on_forward(self, module: torch.nn.Module, args: tuple) -> None:
        if self._open and module.training:
            self._steps += 1

    # No annotations: under `from __future__ import annotations` they are strings, and DDP's
    # hook check compares them to the GradBucket and Future types themselves.
    def _count_allreduce(self, bucket):
        if self._open:
            self._bytes["allreduce_payload"] += _nbytes(bucket.buffer())
        return allreduce_hook(self.ddp.process_group, bucket)
