"""Windows on several workers: one worker picks each window, every worker trains its share of it.

Rank 0 holds the stream (:class:`~recmem.online.source.LandingDirectory` lists, checks and
quarantines files on rank 0 only) and picks the next window after the committed offsets, exactly as
one process does. It cuts the window into the global batches one process would train
(``data.batch_size`` rows, the last one shorter) and sends each worker its slice of every one of
them (one ``scatter``: workers need no access to the landing folder), with the window's key and
offsets. So, with W workers:

- the W slices of a global batch are that batch, split as evenly as rows allow (sizes differ by at
  most one row). A worker's loss is a mean over its own slice and the sharded tables and DDP average
  gradients over workers as if every slice were ``1/W`` of the batch; for a slice that is not, its
  gradient is scaled by ``W * slice / batch`` on the way back (a hook on the model's output), so
  every batch's gradient is the single process's, full or short;
- a window's tail shorter than W rows rides with the batch before it (no slice is ever empty: a
  sharded step needs rows on every worker), so there one step of W workers stands for the two one
  process takes; a window of fewer than W rows in all goes whole to every worker (the averaging over
  workers keeps its gradients the single process's, but collisionless admission filters count its
  IDs W times);
- tables stamp rows with the global batch's newest event time (not the slice's) and expire rows at
  the window's newest, on every shard: data time is the same as in one process;
- test-then-train: every worker scores its slices before training and ``evaluate`` gathers the
  scores, so every rank reports the AUC of the whole window.

Rank 0 also decides when to stop (it holds the stop flag and the idle clock) and says so in the same
message, so every worker leaves the loop after the same window. For deltas and snapshots, which rank
0 sends, every worker hands rank 0 its changed rows (:func:`gather_changes`) or its whole tables
(:func:`gather_forms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from recmem.config import Config
from recmem.data.collate import collate
from recmem.online.source import StreamSource, Window


def shares(rows: int, batch_size: int, world_size: int) -> list[list[tuple[int, int, float]]]:
    """Each worker's slice of each global batch of a window of ``rows`` rows, and its gradient scale.

    Returns:
        ``[rank][batch] -> (begin, end, scale)``: rows ``[begin, end)`` of the window; every rank
        has the same number of batches, none empty (see the module docstring).
    """
    if rows < world_size:  # too few rows to split: every worker trains them all
        return [[(0, rows, 1.0)] for _ in range(world_size)]
    starts = list(range(0, rows, batch_size))
    if len(starts) > 1 and rows - starts[-1] < world_size:
        starts.pop()  # a tail of fewer than W rows joins the batch before it
    bounds = [*starts, rows]
    out: list[list[tuple[int, int, float]]] = [[] for _ in range(world_size)]
    for lo, hi in zip(bounds, bounds[1:]):
        n = hi - lo
        for r in range(world_size):
            begin, end = lo + r * n // world_size, lo + (r + 1) * n // world_size
            out[r].append((begin, end, world_size * (end - begin) / n))
    return out


@dataclass
class SharedWindow:
    """One worker's share of a window (see :class:`~recmem.online.source.Window` for the fields).

    Attributes:
        key, begin, end, last, landed: the whole window's, the same on every worker.
        rows: the whole window's rows.
        newest: the whole window's newest event time (None without one).
        slices: this worker's rows of each global batch.
        scales: each slice's gradient scale.
        batch_newest: each global batch's newest event time.
        whole: the whole window, on rank 0 only (never sent).
    """

    key: str
    begin: int
    end: int
    last: bool
    landed: float | None
    rows: int
    newest: int | None
    slices: list[pa.Table] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    batch_newest: list[int | None] = field(default_factory=list)
    whole: Window | None = None


def next_shared_window(source: StreamSource | None, offsets: dict[str, int], cfg: Config, stop: bool = False,
                       group: Any = None) -> tuple[str, SharedWindow | None]:
    """Rank 0 picks the window after ``offsets`` and every rank gets its share; collective.

    Args:
        source: the stream (rank 0's; ignored on the others).
        offsets: the committed offsets (the same on every rank).
        cfg: the job (``data.batch_size`` is the global batch).
        stop: rank 0's wish to stop now (ignored on the others).
        group: the process group (default: the default group).

    Returns:
        ``("window", share)``, ``("idle", None)`` (no new rows yet) or ``("stop", None)``, the
        same state on every rank.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    messages: list[Any] = [None] * world
    if rank == 0:
        window = None if stop else source.next_window(offsets)
        messages = _split(window, cfg, world) if window is not None else [("stop" if stop else "idle", None)] * world
    mine: list[Any] = [None]
    dist.scatter_object_list(mine, messages if rank == 0 else None, src=0, group=group)
    if rank == 0 and mine[0][1] is not None:
        mine[0][1].whole = window
    return mine[0]


def _split(window: Window, cfg: Config, world: int) -> list[tuple[str, SharedWindow]]:
    """Every rank's share of ``window`` (rank 0's side of :func:`next_shared_window`)."""
    schema, table = cfg.data.schema, window.table
    times = table.column(schema.event_time).to_numpy() if schema.event_time in table.column_names else None
    plan = shares(table.num_rows, cfg.data.batch_size, world)
    # Global batch b is rows [first rank's begin, last rank's end) of the window.
    newest = [int(times[plan[0][b][0]:plan[-1][b][1]].max()) if times is not None else None
              for b in range(len(plan[0]))]
    out = []
    for mine in plan:
        share = SharedWindow(window.key, window.begin, window.end, window.last, window.landed, table.num_rows,
                             max(newest) if times is not None else None, batch_newest=newest)
        for begin, end, scale in mine:
            share.slices.append(table.slice(begin, end - begin))
            share.scales.append(scale)
        out.append(("window", share))
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class GlobalBatches:
    """Hooks on a worker's model that make each slice train as its share of its global batch: the
    gradient scale and the batch's data time (see the module docstring). Slices are recognised by
    identity while :meth:`hold` holds them; other batches (and scoring, in eval mode) pass untouched.

    Args:
        model: this worker's model (a ``CTRModel``).
        evictable: its tables that stamp rows with data time.
    """

    def __init__(self, model: torch.nn.Module, evictable: list[Any]) -> None:
        self.evictable = evictable
        self._held: dict[int, tuple[float, int | None]] = {}
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def hold(self, batches: list[Any], scales: list[float], newest: list[int | None]) -> None:
        """Recognise ``batches`` (one window's slices) until :meth:`release`."""
        self._held = {id(b): (s, t) for b, s, t in zip(batches, scales, newest)}

    def release(self) -> None:
        """Forget the held slices."""
        self._held = {}

    def _before(self, module: torch.nn.Module, inputs: tuple) -> None:
        held = self._held.get(id(inputs[0]))
        if module.training and held is not None and held[1] is not None:
            for table in self.evictable:  # after the loop stamped the slice's own newest time
                table.observe_time(held[1])

    def _after(self, module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor | None:
        held = self._held.get(id(inputs[0]))
        if module.training and held is not None and held[0] != 1.0 and logits.requires_grad:
            return _ScaleGrad.apply(logits, held[0])
        return None


def score_then_train_share(session: Any, share: SharedWindow, cfg: Config, hooks: GlobalBatches,
                           group: Any = None) -> tuple[list, dict[str, Any]]:
    """Score this worker's share of a window with the model as it stands, then train on it; collective.

    Returns:
        (this worker's batches, the window's record: ``key``, ``rows``, ``auc``, ``logloss``,
        ``calibration``, ``newest_time``, ``rows_live``, each of the whole window on every rank),
        as ``loop._score_then_train`` returns for one process.
    """
    from recmem.train.loop import evaluate

    batches = [collate(piece, cfg.data.schema) for piece in share.slices]
    hooks.hold(batches, share.scales, share.batch_newest)
    try:
        scored = evaluate(session.model, iter(batches), "online")  # every rank's scores, gathered
        for _ in session.train_window(batches, lambda: f"{share.key}, rows from {share.begin}"):
            pass
    finally:
        hooks.release()
    if share.newest is not None:
        for table in session.evictable:  # every shard expires at the whole window's newest time
            table.evict(share.newest)
    live = [v for k, v in session.model.tables.stats().items() if k.endswith("/rows_live")]
    total = torch.tensor([sum(live) if live else math.nan], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return batches, {"key": share.key, "rows": share.rows, "auc": scored["online/auc"],
                     "logloss": scored["online/logloss"], "calibration": scored["online/calibration"],
                     "newest_time": share.newest, "rows_live": float(total)}




def gather_changes(model: torch.nn.Module, group: Any = None) -> dict[str, dict[str, torch.Tensor]] | None:
    """Every worker's changed and freed rows since the last call, merged on rank 0; collective.

    Each ID shard of a table that records its changes (``take_changes``: ``collisionless`` with
    ``options.track_changes``) hands over its own; owners never share an ID, so rank 0 concatenates
    them. What travels is proportional to the rows touched, as for one process.

    Returns:
        On rank 0, ``{feature: {"ids": [n] int64, "weights": [n, D], "freed": [m] int64}}`` (the
        shape of one table's ``take_changes``); None on the other ranks.
    """
    mine: dict[str, dict[str, torch.Tensor]] = {}
    for table in model.tables.tables:
        part = getattr(table, "shard", table)
        if hasattr(part, "take_changes"):
            mine.update(part.take_changes())
    world = dist.get_world_size(group)
    everyone: list[Any] | None = [None] * world if dist.get_rank(group) == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=group)
    if everyone is None:
        return None
    return {name: {k: torch.cat([c[name][k] for c in everyone]) for k in ("ids", "weights", "freed")}
            for name in everyone[0]}


def gather_forms(model: torch.nn.Module, cfg: Config, group: Any = None) -> list[Any] | None:
    """Every feature's whole serving form, merged on rank 0 from every worker's pieces (as ``recmem
    export`` does for a Ray checkpoint: ``export/distributed.py``); None on the other ranks. Collective."""
    from recmem.export.distributed import merged_forms, rank_pieces

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pieces = rank_pieces(model, rank, world)
    everyone: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(pieces, everyone, dst=0, group=group)
    return merged_forms(cfg, everyone) if everyone is not None else None
