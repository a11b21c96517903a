"""The peers recmem's training speed is judged against: torchrec's own DLRM, sharded and not.

Both are ``DLRMTrain(DLRM(EmbeddingBagCollection))`` with one table per sparse feature and
``apply_optimizer_in_backward(RowWiseAdagrad)`` on the tables, the way torchrec's examples train:

- sharded: the model wrapped in ``DistributedModelParallel`` (world size 1 here). The planner picks
  fbgemm's fused TBE kernel, which turns the in-backward optimizer into a sparse row update fused with
  the gradient (the strong peer, and what recmem's ``full`` table also does).
- unsharded: the plain ``EmbeddingBagCollection``; backward builds a dense [rows, D] gradient of every
  table and RowWiseAdagrad then sweeps all rows (the naive path).

torchrec's ``DLRMTrain`` reads ``batch.dense_features / sparse_features / labels``, which recmem's
:class:`~recmem.data.batch.Batch` carries under the same names, so both models take the same batches.
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
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad


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
    configs = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=embedding_dim, num_embeddings=rows, feature_names=[f])
        for f in feature_names
    ]
    tables = EmbeddingBagCollection(tables=configs, device=torch.device(device))
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
