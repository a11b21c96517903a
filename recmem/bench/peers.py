"""The peers recmem's training speed is judged against: torchrec's own DLRM, and parts of it swapped
into recmem's model, so that each difference between recmem and torchrec is measured on its own.

torchrec's DLRM is ``DLRMTrain(DLRM(tables))`` with one table per sparse feature, the tables trained
by row-wise Adagrad inside backward, the way torchrec's examples train:

- sharded (:func:`torchrec_dlrm` + :func:`shard`): an ``EmbeddingBagCollection`` with
  ``apply_optimizer_in_backward(RowWiseAdagrad)``, wrapped in ``DistributedModelParallel`` (world size
  1 here). The planner picks fbgemm's fused TBE kernel, which turns the in-backward optimizer into a
  sparse row update fused with the gradient (what recmem's ``full`` table also does); DMP adds DDP's
  all-reduce of the dense gradients and the distribution of the input KJT.
- unsharded, naive (:func:`torchrec_dlrm`): the plain ``EmbeddingBagCollection``; backward builds a
  dense [rows, D] gradient of every table and RowWiseAdagrad then sweeps all rows.
- unsharded, fused (:func:`fused_tables`, :func:`fused_dlrm`): torchrec's
  ``FusedEmbeddingBagCollection`` (the same fbgemm TBE with the row-wise Adagrad update fused into
  backward, on the host) under the same DLRM, without DMP: the sharded peer less DMP.
- :class:`TorchrecTablesModel`: the fused tables under recmem's dense module: recmem's model less its
  ID -> row lookup (torchrec takes IDs already numbered ``0..rows-1``).
- :func:`with_torchrec_interaction`: recmem's dense module with torchrec's stock ``InteractionArch``
  in place of recmem's ``DotInteraction``.

torchrec's ``DLRMTrain`` reads ``batch.dense_features / sparse_features / labels``, which recmem's
:class:`~recmem.data.batch.Batch` carries under the same names, so every model takes the same batches.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.models.dlrm import DLRM, DLRMTrain, InteractionArch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recmem.data.batch import Batch
from recmem.models.dlrm import DLRMDense


@contextmanager
def single_process_group(workdir: Path) -> Iterator[None]:
    """A gloo process group of world size 1 (what ``DistributedModelParallel`` needs), then torn down.

    A file store under ``workdir`` rendezvouses without a TCP port, so concurrent runs cannot collide.
    """
    store = dist.FileStore(str(Path(workdir) / "process_group_store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def torchrec_dlrm(
    feature_names: list[str],
    rows: int,
    embedding_dim: int,
    num_dense: int,
    bottom_mlp: list[int],
    top_mlp: list[int],
    table_learning_rate: float,
    table_eps: float,
    device: str = "cpu",
) -> DLRMTrain:
    """torchrec's DLRM over one ``rows`` x ``embedding_dim`` table per feature, tables trained in backward.

    Args:
        feature_names: the F sparse features, one table each.
        rows: rows of every table (IDs must already lie in ``[0, rows)``).
        embedding_dim: D.
        num_dense: dense input width.
        bottom_mlp: dense arch layer sizes, ending in D.
        top_mlp: over arch layer sizes, ending in 1.
        table_learning_rate: RowWiseAdagrad step size.
        table_eps: RowWiseAdagrad epsilon.
        device: ``"meta"`` to leave the tables for ``DistributedModelParallel`` to allocate, else
            ``"cpu"`` (allocated and initialised here).

    Returns:
        A module mapping a batch to ``(loss, (loss, logits [B], labels [B]))``.
    """
    tables = EmbeddingBagCollection(tables=_configs(feature_names, rows, embedding_dim), device=torch.device(device))
    model = DLRMTrain(DLRM(tables, num_dense, bottom_mlp, top_mlp))
    apply_optimizer_in_backward(
        RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": table_learning_rate, "eps": table_eps}
    )
    return model


def shard(model: DLRMTrain) -> DistributedModelParallel:
    """Wrap in ``DistributedModelParallel`` on CPU (needs a process group; see :func:`single_process_group`).

    Raises:
        RuntimeError: the planner chose a kernel other than fbgemm's fused one for some table, which
            would make this peer a weaker one than intended.
    """
    with warnings.catch_warnings():
        # The planner warns about CPU topology estimates that do not matter on one process.
        warnings.simplefilter("ignore")
        quiet = logging.getLogger("torchrec")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            sharded = DistributedModelParallel(model, device=torch.device("cpu"))
        finally:
            quiet.setLevel(level)
    kernels = {name: p.compute_kernel for plan in sharded.plan.plan.values() for name, p in plan.items()}
    if set(kernels.values()) != {"fused"}:
        raise RuntimeError(f"expected fbgemm's fused kernel for every table, the planner chose {kernels}")
    return sharded


def dense_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters not trained in backward: what the dense optimizer owns."""
    return [p for _, p in in_backward_optimizer_filter(model.named_parameters())]


def _configs(feature_names: list[str], rows: int, embedding_dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=embedding_dim, num_embeddings=rows, feature_names=[f])
        for f in feature_names
    ]


def fused_tables(
    feature_names: list[str], rows: int, embedding_dim: int, table_learning_rate: float, table_eps: float
) -> FusedEmbeddingBagCollection:
    """torchrec's ``FusedEmbeddingBagCollection`` on the host: one ``rows`` x ``embedding_dim`` table per
    feature in one fbgemm TBE, updated by exact row-wise Adagrad inside backward (no DMP needed).

    Returns:
        A module mapping a KJT of IDs in ``[0, rows)`` to a ``KeyedTensor`` of values [B, F * D].
    """
    return FusedEmbeddingBagCollection(
        tables=_configs(feature_names, rows, embedding_dim), optimizer_type=RowWiseAdagrad,
        optimizer_kwargs={"lr": table_learning_rate, "eps": table_eps}, device=torch.device("cpu"),
    )


def fused_dlrm(
    tables: FusedEmbeddingBagCollection, num_dense: int, bottom_mlp: list[int], top_mlp: list[int]
) -> tuple[DLRMTrain, list[torch.nn.Parameter]]:
    """torchrec's stock DLRM over fused tables, unsharded.

    Returns:
        The model (batch -> ``(loss, (loss, logits [B], labels [B]))``) and its dense parameters (the
        tables train themselves in backward).
    """
    model = DLRMTrain(DLRM(tables, num_dense, bottom_mlp, top_mlp))
    dense = [p for n, p in model.named_parameters() if not n.startswith("model.sparse_arch.")]
    return model, dense


class TorchrecTablesModel(torch.nn.Module):
    """torchrec's fused tables under recmem's dense module: Batch -> logits [B].

    Args:
        tables: from :func:`fused_tables`, one table per feature of D columns.
        dense: (dense [B, n_dense], pooled [B, F, D]) -> logits [B], e.g. recmem's ``DLRMDense``.
    """

    def __init__(self, tables: FusedEmbeddingBagCollection, dense: torch.nn.Module) -> None:
        super().__init__()
        self.tables = tables
        self.dense = dense
        self.num_features = len(tables.embedding_bag_configs())

    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch of B rows whose IDs lie in ``[0, rows)`` -> logits [B]."""
        values = self.tables(batch.sparse_features).values()  # [B, F * D]
        pooled = values.view(values.shape[0], self.num_features, -1)  # [B, F, D]
        return self.dense(batch.dense_features, pooled)


def with_torchrec_interaction(dense: DLRMDense) -> DLRMDense:
    """``dense`` with torchrec's stock ``InteractionArch`` in place of recmem's ``DotInteraction`` (the
    same output; torchrec's gathers the pairs by 2-D indexing, whose backward is an ``index_put_``)."""
    dense.interaction = InteractionArch(dense.interaction.F)
    return dense
