"""Where recmem's training step goes: its phases timed one by one, beside whole steps on the same batches.

The step is the training loop's (``recmem/train/loop.py``) on a :class:`~recmem.models.CTRModel` whose
tables are one ``full`` table, cut where the tables hand the pooled embeddings to the dense part:

1. ``id_lookup``: raw IDs -> vocabulary rows (``FullTable.remap``), which torchrec does not do (its
   IDs arrive numbered ``0..rows-1``).
2. ``tbe_forward``: fbgemm's TBE pools the rows, [B, F, D].
3. ``dense_forward``: the dense part (under bf16 autocast when the model's is) and the loss.
4. ``dense_backward``: ``zero_grad`` and backward down to the pooled embeddings.
5. ``tbe_backward``: the TBE's backward, which applies row-wise Adagrad to the touched rows.
6. ``dense_optimizer``: the dense optimizer's ``step()`` and reading the loss.

Phased and whole steps alternate, so a neighbour's load on a shared machine slows both alike; the
phases' sum against the whole step shows what cutting the step costs (a second backward call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from recmem.data.batch import Batch
from recmem.models import CTRModel
from recmem.tables.full import FullTable

PHASES = ("id_lookup", "tbe_forward", "dense_forward", "dense_backward", "tbe_backward", "dense_optimizer")
"""The phases, in the order a step runs them (see the module docstring)."""


@dataclass
class PhaseTimes:
    """Seconds spent per phase and in whole steps, over ``steps`` of each."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    whole_seconds: float = 0.0
    steps: int = 0

    def per_step_ms(self) -> dict[str, float]:
        """Milliseconds per step of each phase, of their sum (``sum``) and of a whole step (``whole``)."""
        ms = {name: 1000 * s / max(self.steps, 1) for name, s in self.seconds.items()}
        return {**ms, "sum": sum(ms.values()), "whole": 1000 * self.whole_seconds / max(self.steps, 1)}


def phased_step(model: CTRModel, optimizer: torch.optim.Optimizer, batch: Batch,
                clock: Callable[[], float]) -> dict[str, float]:
    """One training step of ``model`` cut into :data:`PHASES`; returns each phase's seconds.

    Args:
        model: a CPU model whose tables are one ``full`` table.
        optimizer: the optimizer of ``model.dense``.
        batch: B rows.
        clock: what times the phases (``time.perf_counter`` or ``time.process_time``).

    Raises:
        TypeError: the model's tables are not a single ``full`` table.
    """
    (table,) = model.tables.tables
    if not isinstance(table, FullTable):
        raise TypeError(f"phases are cut for one `full` table, got {type(table).__name__}")
    features = batch.sparse_features
    marks = [clock()]
    rows = table.remap(features)  # [N]
    marks.append(clock())
    out = table.rows(rows, features.offsets())  # [B, F, D]
    marks.append(clock())
    pooled = out.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.bf16):
        logits = model.dense(batch.dense_features, pooled)  # [B]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch.labels)
    marks.append(clock())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(clock())
    out.backward(pooled.grad)
    marks.append(clock())
    optimizer.step()
    float(loss.detach())  # the loop reads the loss every step too
    marks.append(clock())
    return {name: end - start for name, start, end in zip(PHASES, marks, marks[1:])}


def measure_phases(
    model: CTRModel, optimizer: torch.optim.Optimizer, whole: Callable[[Batch], float], batches: Iterable[Batch],
    clock: Callable[[], float], max_seconds: float = math.inf,
) -> PhaseTimes:
    """For each batch, a phased step of ``model`` then a whole step (``whole``, the same model and
    ``optimizer``) on it, stopping early once ``max_seconds`` have passed on ``clock`` (after one pair
    at least); the model must live on the CPU."""
    times, start = PhaseTimes(), clock()
    for batch in batches:
        if times.steps and clock() - start > max_seconds:
            break
        for name, seconds in phased_step(model, optimizer, batch, clock).items():
            times.seconds[name] += seconds
        tick = clock()
        whole(batch)
        times.whole_seconds += clock() - tick
        times.steps += 1
    return times
