"""TorchRec's ``DistributedModelParallel`` for row-keyed tables (``full``, ``hash``).

A row-keyed block (its router and row counts, ``RowKeys``) becomes a torchrec
``EmbeddingBagCollection``, one table per feature, built on the meta device and trained by fused
row-wise Adagrad in backward (``apply_optimizer_in_backward``), the optimizer of the unsharded tables.
torchrec takes row numbers, so every worker first maps raw IDs to rows with the router::

    raw-ID KJT -> router -> row KJT -> ShardedEmbeddingBagCollection -> [B, F, D]
                                       (IDs to the rows' owners, lookup, pooled rows back)

Layouts: ``table_wise`` (each table whole on one worker), ``row_wise`` (row ranges on every worker),
``column_wise`` (column ranges), or ``auto``: torchrec's planner picks table- or row-wise per table.
torchrec's sharder offers no row-wise sharding on CPU; the one here offers the layouts asked for, on
fbgemm's fused kernel. Column-wise parts keep their own row-wise Adagrad state (the mean of g^2 over
their columns only), so column-wise training is close to, not equal to, the unsharded table's; table-
and row-wise training are equal. Data-parallel tables are not offered: under DMP on CPU they are left
out of DDP and lose their in-backward optimizer (they would silently stop training).

Gradient scale: each worker's loss is a mean over its own rows and the sharded collection sums a
row's gradients over all workers, W times the gradient of the global-batch mean. A hook scales the
pooled gradients by 1/W, so W workers train like one on the global batch, as on the ID-sharded path.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.tables.sharded import initial_rows

LAYOUTS = ("table_wise", "row_wise", "column_wise")
# The planner's choices under "auto": the layouts whose training equals the unsharded table's.
# Column-wise parts keep their own row-wise Adagrad state (g^2 averaged over their columns only).
AUTO_LAYOUTS = ("table_wise", "row_wise")
_EPS = 1e-8  # FusedRowwiseAdagrad's


class _CpuSharder(EmbeddingBagCollectionSharder):
    """torchrec's sharder, offering ``layouts`` on CPU, all on fbgemm's fused kernel."""

    def __init__(self, layouts: list[str]) -> None:
        super().__init__()
        self._layouts = list(layouts)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._layouts

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return ["fused"]


class DmpTables(torch.nn.Module):
    """One row-keyed block of F tables, split over ``group`` by ``DistributedModelParallel``.

    Collective: every worker builds it, and runs forward and backward, together. Starts from the
    values the unsharded ``FusedRowwiseAdagrad(rows, D, learning_rate, seed)`` starts from.

    Args:
        feature_names: the F features (one table each).
        router: raw IDs -> global rows (the kind's ``RowKeys.router``).
        rows: rows of each feature's table.
        embedding_dim: D.
        learning_rate: row-wise Adagrad step size.
        seed: the unsharded table's seed.
        group: the process group of the table exchanges.
        layout: one of ``LAYOUTS`` for every table, or ``"auto"`` for torchrec's planner.
    """

    def __init__(self, feature_names: list[str], router: torch.nn.Module, rows: list[int], embedding_dim: int,
                 learning_rate: float, seed: int, group: dist.ProcessGroup, layout: str) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.router = router
        self.group = group
        ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name=f, embedding_dim=embedding_dim, num_embeddings=n, feature_names=[f])
             for f, n in zip(feature_names, rows)], device=torch.device("meta"))
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": learning_rate, "eps": _EPS})
        layouts = list(AUTO_LAYOUTS) if layout == "auto" else [layout]
        sharder = _CpuSharder(layouts)
        world = dist.get_world_size(group)
        # torchrec cuts columns at least 128 wide; CTR tables are narrower, so column-wise would not
        # split a table at all. Asked for, it splits one into up to W parts.
        columns = max(1, embedding_dim // world)
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device="cpu"),
            constraints={f: ParameterConstraints(sharding_types=layouts, min_partition=columns) for f in feature_names})
        with warnings.catch_warnings(), _quiet("torchrec"):
            warnings.simplefilter("ignore")  # the planner's CPU cost estimates are rough; it says so
            plan = planner.collective_plan(ebc, [sharder], group)
            dmp = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(group),
                                           device=torch.device("cpu"), plan=plan, sharders=[sharder])
        # Kept out of the module tree: its state goes through get/set_extra_state, since torch's
        # recursive load_state_dict does not know DMP's key names.
        self.__dict__["dmp"] = dmp
        self.layout = {name: p.sharding_type for module in plan.plan.values() for name, p in module.items()}
        self.grad_scale = 1.0 / world
        self._start_from(rows, seed)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` (local batch b) -> [b, F, D] pooled embeddings."""
        batch = features.stride()
        rows = KeyedJaggedTensor(keys=features.keys(), values=self.router(features),
                                 lengths=features.lengths(), stride=batch)
        keyed = self.dmp(rows)
        # The sharded collection returns its features grouped by layout and owner, not in the order
        # asked for (table-wise: each worker's tables together): put them back in feature order.
        order = torch.tensor([keyed.keys().index(f) for f in self.feature_names])
        pooled = keyed.values().view(batch, len(self.feature_names), self.embedding_dim)[:, order]
        if pooled.requires_grad:
            pooled.register_hook(lambda grad: grad * self.grad_scale)
        return pooled

    def train(self, mode: bool = True) -> "DmpTables":
        """Set train/eval mode here and on the DMP module."""
        self.dmp.train(mode)
        return super().train(mode)

    def get_extra_state(self) -> dict[str, Any]:
        """This worker's shards of the rows and of their optimizer state, as plain tensors (see
        :func:`_plain`): a checkpoint then loads with ``weights_only`` and no pickled classes."""
        return {"weights": _plain(self.dmp.state_dict()), "optimizer": _plain(self.dmp.fused_optimizer.state_dict())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved (same workers and layout)."""
        self.dmp.load_state_dict(_filled(self.dmp.state_dict(), state["weights"]))
        self.dmp.fused_optimizer.load_state_dict(_filled(self.dmp.fused_optimizer.state_dict(), state["optimizer"]))

    @torch.no_grad()
    def _start_from(self, rows: list[int], seed: int) -> None:
        """Copy the unsharded initial values into this worker's part of each table."""
        local = self._local_parts()
        for t, start, chunk in initial_rows(rows, self.embedding_dim, seed):
            for row0, col0, part in local[self.feature_names[t]]:  # [rows, columns] of the part
                lo, hi = max(start, row0), min(start + len(chunk), row0 + part.shape[0])
                if lo < hi:
                    part[lo - row0 : hi - row0] = chunk[lo - start : hi - start, col0 : col0 + part.shape[1]]

    def _local_parts(self) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
        """Per feature: (first row, first column, writable view) of each part held here."""
        parts: dict[str, list[tuple[int, int, torch.Tensor]]] = {f: [] for f in self.feature_names}
        for key, value in self.dmp.state_dict(keep_vars=True).items():
            feature = key.split(".")[-2]  # embedding_bags.<feature>.weight
            for shard in value.local_shards():
                row0, col0 = shard.metadata.shard_offsets
                parts[feature].append((row0, col0, shard.tensor.data))
        return parts

    def memory_bytes(self) -> int:
        """Bytes of the rows and row-wise Adagrad state held by this worker, plus the router."""
        rows = sum(part.numel() + part.shape[0] for held in self._local_parts().values() for *_, part in held)
        router = sum(b.numel() * b.element_size() for b in self.router.buffers())
        return rows * 4 + router

    def stats(self) -> dict[str, float]:
        """Rows held on this worker (a column-wise part counts its rows once per part)."""
        return {"rows": float(sum(part.shape[0] for held in self._local_parts().values() for *_, part in held))}


def _plain(state: Any) -> Any:
    """``state`` with each ``ShardedTensor`` replaced by ``{"local_shards": [tensor, ...], "offsets":
    [[row, column], ...]}``, this worker's parts of it (nested dicts and lists are walked)."""
    if isinstance(state, ShardedTensor):
        shards = state.local_shards()
        return {"local_shards": [s.tensor for s in shards], "offsets": [list(s.metadata.shard_offsets) for s in shards]}
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_plain(v) for v in state)
    return state


def _filled(template: Any, saved: Any, where: str = "") -> Any:
    """``saved`` (from :func:`_plain`) as a state to load: each of its sharded entries copied into the
    ``ShardedTensor`` at the same place in ``template`` (a state of the same module, this worker's).

    Raises:
        ValueError: a saved entry holds other parts than this worker's (another plan or rank).
    """
    if isinstance(template, ShardedTensor):
        shards = template.local_shards()
        offsets = [list(s.metadata.shard_offsets) for s in shards]
        if not isinstance(saved, dict) or saved.get("offsets") != offsets:
            raise ValueError(f"{where}: the checkpoint holds other parts than this worker's {offsets}")
        for shard, tensor in zip(shards, saved["local_shards"]):
            shard.tensor.detach().copy_(tensor)
        return template
    if isinstance(template, dict) and isinstance(saved, dict):
        return {k: _filled(template[k], v, f"{where}.{k}") if k in template else v for k, v in saved.items()}
    if isinstance(template, (list, tuple)) and isinstance(saved, (list, tuple)) and len(template) == len(saved):
        return type(saved)(_filled(t, v, f"{where}.{i}") for i, (t, v) in enumerate(zip(template, saved)))
    return saved


class _quiet:
    """Raise a logger's level for a block (torchrec logs every planner decision at INFO)."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
