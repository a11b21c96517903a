"""The loop's guards against training on garbage: non-finite losses and weights, found on any rank.

Under ``torch.distributed``, where ranks must take the same decision, a problem one rank sees is made
every rank's (:func:`any_rank`): all of them skip the same batch (``train.nonfinite: skip``; their
collectives would otherwise wait for a peer that left) or refuse the same checkpoint. Stopping needs
no agreement: the rank that raises ends the run, and Ray ends its peers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from recmem.data.batch import Batch
from recmem.models import CTRModel
from recmem.tables.base import tensor_bytes


class TrainingDiverged(ValueError):
    """A step's loss or the weights to checkpoint are not finite: the message names the step."""


def state_bytes(model: CTRModel, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors a checkpoint of ``model`` and ``optimizer`` holds (this rank's part)."""
    dense = sum(p.numel() * p.element_size() for p in model.dense.parameters())
    saved = tensor_bytes(*(t for _, t in _tensors(model.state_dict())))  # storages, once each, as torch.save writes them
    return saved + dense * (2 if isinstance(optimizer, torch.optim.Adam) else 1)


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in ``state`` (nested) that hold NaN or infinity."""
    bad = []
    for name, value in _tensors(state):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


def _tensors(data, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts and lists; a sharded tensor's local shards."""
    if hasattr(data, "local_shards"):  # a ShardedTensor (a Tensor subclass): this rank's pieces
        for i, shard in enumerate(data.local_shards()):
            yield f"{prefix}[shard {i}]", shard.tensor
    elif isinstance(data, torch.Tensor):
        yield prefix, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from _tensors(value, f"{prefix}.{i}")


def any_rank(problem: str | None) -> str | None:
    """``problem`` of this rank, or under ``torch.distributed`` every rank's joined (None: none has
    one): all ranks take the same decision at the same step, as their collectives need."""
    if world_size() == 1:
        return problem
    flag = torch.tensor([float(problem is not None)], device=_flag_device())
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
    if not flag.item():
        return None
    problems: list[str | None] = [None] * world_size()
    torch.distributed.all_gather_object(problems, problem)
    return "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)


def _flag_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def why_nonfinite(batch: Batch, loss: float) -> str:
    """What a non-finite ``loss`` says about its batch."""
    if not bool(torch.isfinite(batch.dense_features).all()):
        return f"loss {loss}; the batch's dense features hold NaN or infinity (the data is bad)"
    return f"loss {loss}; the batch's inputs are finite, so the model diverged"


def world_size() -> int:
    """Ranks under ``torch.distributed``; 1 without it."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
