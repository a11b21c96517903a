"""OptEmbed's retrained table (phase 3): only the kept rows, each field at its searched width.

The search's outcome is a *plan* (a file the ``optembed`` command writes, ``options.plan`` names):
per field its width d_f (1..D), the sorted raw IDs whose rows the thresholds kept, and whether the
out-of-vocabulary row was kept. The table it builds stores nothing else::

    field f:  rows [0, n_f)  one per kept ID, width d_f  |  row n_f: the default (the OOV row if kept)

An ID without a kept row (pruned in phase 1, or never seen) answers the default row when the plan
kept the OOV row, else nothing (a zero row, as the supernet's pruned rows). The pooled [B, d_f] is
zero-padded to the model's width D, which serving states as a ``projection`` that is the identity's
first d_f columns, so a server answers exactly as this table.

Storage: fbgemm's fused kernel (row-wise Adagrad in backward, nothing differentiates a norm any
more) takes rows of a multiple of 4 floats, so a width is *stored* rounded up to one (3 as 4, 6 as
8); the extra columns start at zero, are multiplied out of the output, get no gradient and are not
exported. Fields of one stored width share one kernel (at most ceil(D / 4) kernels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.tables.base import ServingForm, tensor_bytes
from recmem.tables.full import vocab_rows
from recmem.tables.fused import FusedRowwiseAdagrad

PLAN_FORMAT = "recmem.optembed.plan/1"


@dataclass
class Plan:
    """What the search found for one block of fields (written by ``recmem optembed``).

    Attributes:
        features: the block's fields, in order.
        embedding_dim: D, the supernet's width.
        widths: d_f per field, in 1..D.
        keys: per field, the sorted raw int64 IDs whose rows were kept.
        default: per field, whether the out-of-vocabulary row was kept.
    """

    features: list[str]
    embedding_dim: int
    widths: list[int]
    keys: list[torch.Tensor]
    default: list[bool]

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, fsync, rename) as tensors and plain data."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save({"format": PLAN_FORMAT, "features": self.features, "embedding_dim": self.embedding_dim,
                        "widths": self.widths, "keys": self.keys, "default": self.default}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, features: list[str], embedding_dim: int, key: str) -> "Plan":
        """Read and check a plan for ``features`` at width ``embedding_dim``.

        Raises:
            ValueError: naming ``key`` (the option that named the file) and the file: missing,
                not tensors and plain data, or holding a plan of other fields, widths out of
                1..D, keys not strictly ascending int64.
        """
        where = f"{key}: {path}"
        if not path.is_file():
            raise ValueError(f"{where}: no such plan file (run `recmem optembed` to write one)")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an UnpicklingError names what it refused
            raise ValueError(f"{where}: not a plan of tensors and plain data ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"{where}: not a {PLAN_FORMAT} file")
        if data.get("features") != list(features) or data.get("embedding_dim") != embedding_dim:
            raise ValueError(f"{where}: a plan for fields {data.get('features')} at width {data.get('embedding_dim')}, "
                             f"this block has {list(features)} at width {embedding_dim}")
        widths, keys, default = data.get("widths"), data.get("keys"), data.get("default")
        num = len(features)
        if not (isinstance(widths, list) and len(widths) == num
                and all(isinstance(w, int) and 1 <= w <= embedding_dim for w in widths)):
            raise ValueError(f"{where}: widths {widths!r} are not {num} integers in 1..{embedding_dim}")
        if not (isinstance(default, list) and len(default) == num and all(isinstance(d, bool) for d in default)):
            raise ValueError(f"{where}: default {default!r} is not {num} booleans")
        if not (isinstance(keys, list) and len(keys) == num):
            raise ValueError(f"{where}: keys are not {num} arrays")
        for name, k in zip(features, keys):
            if not (isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.dim() == 1):
                raise ValueError(f"{where}: keys of {name!r} are not a 1-D int64 array")
            if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
                raise ValueError(f"{where}: keys of {name!r} are not strictly ascending")
        return cls(list(features), embedding_dim, widths, keys, default)


def stored_width(width: int) -> int:
    """The width fbgemm stores a row of ``width`` at: the next multiple of 4."""
    return -(-width // 4) * 4


def compact_bytes(kept: list[int], widths: list[int]) -> int:
    """The bytes a :class:`CompactTable` of ``kept`` IDs per field at ``widths`` holds: per field
    kept + 1 rows of the stored width with their Adagrad state, 8 bytes per kept ID, and each
    kernel's [fields, stored width] column mask (the search's memory limit; the table measures its
    own live tensors)."""
    stored = [stored_width(w) for w in widths]
    return sum((k + 1) * 4 * (s + 1) + 8 * k + 4 * s for k, s in zip(kept, stored))


class CompactTable(torch.nn.Module):
    """The kept rows of each field at its width, zero-padded to D (see the module docstring).

    Args:
        plan: the search's outcome for these fields.
        embedding_dim: D, the model's width (the plan's).
        learning_rate: row-wise Adagrad step size.
        seed: seeds the initial rows (a fresh start: the paper retrains from scratch).
    """

    def __init__(self, plan: Plan, embedding_dim: int, learning_rate: float, seed: int = 0) -> None:
        super().__init__()
        self.feature_names = list(plan.features)
        self.embedding_dim = embedding_dim
        self.widths, self.default = list(plan.widths), list(plan.default)
        for i, keys in enumerate(plan.keys):
            self.register_buffer(f"keys_{i}", keys.clone())
        self.sizes = [len(k) for k in plan.keys]  # n_f; row n_f is the default slot
        stored = sorted({stored_width(w) for w in self.widths})
        self.groups = [[f for f, w in enumerate(self.widths) if stored_width(w) == s] for s in stored]
        self.kernels = torch.nn.ModuleList(
            FusedRowwiseAdagrad([self.sizes[f] + 1 for f in fields], s, learning_rate, seed + g)
            for g, (s, fields) in enumerate(zip(stored, self.groups)))
        masks = []
        with torch.no_grad():
            for kernel, fields in zip(self.kernels, self.groups):
                for t, f in enumerate(fields):
                    kernel.weights(t)[:, self.widths[f]:] = 0
                    if not self.default[f]:
                        kernel.weights(t)[self.sizes[f]] = 0  # never read
                masks.append(torch.stack([(torch.arange(kernel.embedding_dim) < self.widths[f]).float()
                                          for f in fields]))  # [F_g, s]
        for g, mask in enumerate(masks):
            self.register_buffer(f"columns_{g}", mask, persistent=False)
        self._order = torch.argsort(torch.tensor([f for fields in self.groups for f in fields]))

    def _keys(self, i: int) -> torch.Tensor:
        return getattr(self, f"keys_{i}")

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        num, batch, dim = len(self.feature_names), features.stride(), self.embedding_dim
        local = vocab_rows(features, [self._keys(i) for i in range(num)])  # [N], n_f: no kept row
        lengths = features.lengths().view(num, batch).long()  # [F, B]
        field = torch.repeat_interleave(torch.arange(num), lengths.sum(1))  # [N]
        answered = (local < torch.tensor(self.sizes)[field]) | torch.tensor(self.default)[field]
        if not bool(answered.all()):  # IDs without a row and no default contribute nothing
            bag = torch.repeat_interleave(torch.arange(num * batch), lengths.flatten())
            lengths = torch.bincount(bag[answered], minlength=num * batch).view(num, batch)
            local = local[answered]
        segments = torch.split(local, lengths.sum(1).tolist())
        pooled = []
        for g, (kernel, fields) in enumerate(zip(self.kernels, self.groups)):
            flat = lengths[fields].flatten()
            offsets = torch.cat([flat.new_zeros(1), torch.cumsum(flat, 0)])
            part = kernel(torch.cat([segments[f] for f in fields]), offsets)  # [B, F_g, s]
            part = (part * getattr(self, f"columns_{g}"))[..., :dim]
            pooled.append(F.pad(part, (0, dim - part.shape[-1])))  # [B, F_g, D]
        return torch.cat(pooled, dim=1)[:, self._order]

    def _field_rows(self, f: int) -> torch.Tensor:
        """Field f's stored rows [n_f + 1, stored width] (a view)."""
        g = next(g for g, fields in enumerate(self.groups) if f in fields)
        return self.kernels[g].weights(self.groups[g].index(f))

    def to_serving(self) -> list[ServingForm]:
        """Per field a ``keyed`` lookup of the kept rows cut to d_f (the default row, or zeros),
        with the identity's first d_f columns as its ``projection`` when d_f < D."""
        out = []
        for f, width in enumerate(self.widths):
            rows = self._field_rows(f).detach()[:, :width]
            default = rows[-1].clone() if self.default[f] else torch.zeros(width)
            tensors = {"keys": self._keys(f).clone(), "rows": rows[:-1].clone(), "default": default}
            if width < self.embedding_dim:
                tensors["projection"] = torch.eye(self.embedding_dim)[:, :width].contiguous()
            out.append(ServingForm("keyed", tensors))
        return out

    def memory_bytes(self) -> int:
        """Kept rows and their Adagrad state, the kept IDs (live tensors)."""
        return sum(k.memory_bytes() for k in self.kernels) + tensor_bytes(*self.buffers(recurse=False))

    def stats(self) -> dict[str, float]:
        """Rows stored, the mean width, memory."""
        return {"rows": float(sum(self.sizes)), "mean_width": sum(self.widths) / len(self.widths),
                "memory_bytes": float(self.memory_bytes())}
