"""OptEmbed's supernet (phases 1 and 2): full-width rows behind learned row masks and sampled widths.

Per ID with row e (width D) of field f, the supernet's embedding is::

    e * m_e * m_d      m_e = S(||e||_1 - t_f)   (1: the row is kept, 0: pruned)
                       m_d = [1] * w + [0] * (D - w)   (a prefix of width w)

S is the unit step (S(0) = 0: a row is kept only when its L1 norm *exceeds* the threshold). Its
gradient is the long-tailed estimator of Dynamic Sparse Training (Liu et al., ICLR 2020), the
trainable-threshold scheme OptEmbed-E builds on::

    dS/dx ~ 2 - 4|x|  for |x| <= 0.4,   0.4  for 0.4 < |x| <= 1,   0  beyond

so the threshold t_f and every row near it get a gradient, and a pruned row can grow back. In
training, w is drawn uniformly from 1..D for each sample and field (bags of one sample share it) by
a generator the table owns, re-seeded from the table's seed and a draw counter kept in its state (a
resumed run draws the same widths; the global RNG is never touched). In eval mode w is the
``widths`` set by the search (default D). The loss gains ``alpha * sum_f exp(-t_f)``
(:meth:`SupernetTable.auxiliary_loss`), which pushes thresholds up against the loss's pull.

Rows and their optimizer: fbgemm's fused kernel with exact row-wise Adagrad, each ID a bag of its
own, so autograd sees every ID's row and differentiates the norm, the step and both masks; the
kernel receives that gradient per ID and updates the rows. The thresholds train with an Adam of
their own (the paper's separate threshold learning rate), stepped as their gradient is accumulated
in backward, as the rows' optimizer is; its state is in the table's state.
"""

from __future__ import annotations

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.tables.base import ServingForm, tensor_bytes
from recmem.tables.full import vocab_rows
from recmem.tables.fused import FusedRowwiseAdagrad
from recmem.tables.optembed.compact import Plan


def step_gradient(x: torch.Tensor) -> torch.Tensor:
    """DST's long-tailed estimate of the unit step's derivative at ``x``."""
    ax = x.abs()
    return torch.where(ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1, torch.full_like(ax, 0.4), torch.zeros_like(ax)))


class UnitStep(torch.autograd.Function):
    """S(x) = 1 where x > 0, else 0; backward multiplies by :func:`step_gradient`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        """x [...] -> 0/1 [...] of x's dtype."""
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        """The incoming gradient times the surrogate derivative at x."""
        (x,) = ctx.saved_tensors
        return grad * step_gradient(x)


def row_mask(rows: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """m_e = S(||row||_1 - t): rows [..., D], thresholds broadcast to [...] -> [...] of 0/1."""
    return UnitStep.apply(rows.abs().sum(-1) - thresholds)


def sample_widths(generator: torch.Generator, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Widths drawn uniformly from 1..dim -> int64 tensor of ``shape``."""
    return torch.randint(1, dim + 1, shape, generator=generator)


class SupernetTable(torch.nn.Module):
    """Full-width rows per field (vocabulary from the statistics + one OOV row), thresholds, widths.

    Args:
        feature_names: the F fields.
        vocabularies: per field, the sorted unique raw int64 IDs that own a row.
        embedding_dim: D.
        learning_rate: the rows' row-wise Adagrad step size.
        alpha: weight of the threshold regulariser ``sum_f exp(-t_f)``.
        threshold_lr: the thresholds' Adam step size.
        threshold_init: every t_f at the start.
        seed: seeds the rows and the width sampler.
        sample_widths: draw widths in training (False: train at ``widths``, OptEmbed-E alone).
    """

    def __init__(self, feature_names: list[str], vocabularies: list[np.ndarray], embedding_dim: int,
                 learning_rate: float, alpha: float, threshold_lr: float, threshold_init: float = 0.0, seed: int = 0,
                 sample_widths: bool = True) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.embedding_dim = embedding_dim
        self.alpha, self.threshold_lr, self.seed, self.sample_widths = alpha, threshold_lr, seed, sample_widths
        num = len(feature_names)
        for i, vocab in enumerate(vocabularies):
            self.register_buffer(f"vocab_{i}", torch.as_tensor(vocab, dtype=torch.int64))
        self.rows = FusedRowwiseAdagrad([len(v) + 1 for v in vocabularies], embedding_dim, learning_rate, seed)
        self.thresholds = torch.nn.Parameter(torch.full((num,), float(threshold_init)))
        # Adam state of the thresholds (first and second moments, steps taken) and the sampler's draws
        self.register_buffer("threshold_moments", torch.zeros(2, num))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self.register_buffer("widths", torch.full((num,), embedding_dim, dtype=torch.int64), persistent=False)
        self.thresholds.register_post_accumulate_grad_hook(self._step_thresholds)
        self._generator = torch.Generator()

    def _vocab(self, i: int) -> torch.Tensor:
        return getattr(self, f"vocab_{i}")

    @torch.no_grad()
    def _step_thresholds(self, param: torch.nn.Parameter) -> None:
        """One Adam step (betas 0.9, 0.999) of the thresholds, as backward accumulates their gradient."""
        grad, (first, second) = param.grad, self.threshold_moments
        self.threshold_steps += 1
        k = int(self.threshold_steps)
        first.mul_(0.9).add_(grad, alpha=0.1)
        second.mul_(0.999).addcmul_(grad, grad, value=0.001)
        step = (first / (1 - 0.9**k)) / ((second / (1 - 0.999**k)).sqrt() + 1e-8)
        param.sub_(self.threshold_lr * step)
        param.grad = None

    def set_widths(self, widths: list[int]) -> None:
        """The per-field widths eval mode uses (the search's candidate), each in 1..D."""
        if len(widths) != len(self.feature_names) or not all(1 <= w <= self.embedding_dim for w in widths):
            raise ValueError(f"widths {widths}: need {len(self.feature_names)} values in 1..{self.embedding_dim}")
        self.widths.copy_(torch.tensor(widths, dtype=torch.int64))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw-ID KJT of ``feature_names`` -> [B, F, D]."""
        num, batch, dim = len(self.feature_names), features.stride(), self.embedding_dim
        rows = vocab_rows(features, [self._vocab(i) for i in range(num)])  # [N] table-local
        lengths = features.lengths().view(num, batch).long()  # [F, B]
        widths = self._widths(batch)  # [B, F]
        prefix = (torch.arange(dim) < widths[..., None]).float()  # [B, F, D]
        if bool((lengths == 1).all()):  # one ID per bag (Criteo): each bag is its ID
            emb = self.rows(rows, features.offsets())  # [B, F, D]
            return emb * row_mask(emb, self.thresholds)[..., None] * prefix
        per_id = self._per_id(rows, lengths)  # [N, D], field-major
        field = torch.repeat_interleave(torch.arange(num), lengths.sum(1))  # [N]
        bag = torch.repeat_interleave(torch.arange(num * batch), lengths.flatten())  # [N] field-major bag
        masked = per_id * row_mask(per_id, self.thresholds[field])[:, None]
        masked = masked * prefix.transpose(0, 1).reshape(num * batch, dim)[bag]
        out = masked.new_zeros(num * batch, dim).index_add_(0, bag, masked)
        return out.view(num, batch, dim).transpose(0, 1)  # [B, F, D]

    def _widths(self, batch: int) -> torch.Tensor:
        """[B, F] widths: drawn per sample and field in training, the set ``widths`` in eval."""
        if not (self.training and self.sample_widths):
            return self.widths.expand(batch, -1)
        self._generator.manual_seed(self.seed * 1_000_003 + int(self.draws))
        self.draws += 1
        return sample_widths(self._generator, (batch, len(self.feature_names)), self.embedding_dim)

    def _per_id(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each ID's row [N, D] (field-major), every ID a bag of its own in the fused kernel."""
        counts = lengths.sum(1)  # [F] IDs per field
        slots = max(int(counts.max()), 1)
        single = (torch.arange(slots)[None, :] < counts[:, None]).long()  # [F, slots]
        offsets = torch.cat([single.new_zeros(1), torch.cumsum(single.flatten(), 0)])
        per_slot = self.rows(rows, offsets)  # [slots, F, D]
        return per_slot.transpose(0, 1)[single.bool()]  # [N, D]

    def auxiliary_loss(self) -> torch.Tensor:
        """``alpha * sum_f exp(-t_f)``: the regulariser that raises thresholds."""
        return self.alpha * torch.exp(-self.thresholds).sum()

    @torch.no_grad()
    def kept(self) -> list[torch.Tensor]:
        """Per field [n + 1] bool: the rows (vocabulary, then OOV) whose L1 norm exceeds t_f."""
        return [self.rows.weights(f).abs().sum(1) > self.thresholds[f] for f in range(len(self.feature_names))]

    def compact_plan(self, widths: list[int]) -> Plan:
        """The retrain's plan at these widths: per field the IDs whose rows are kept, and the OOV row's fate."""
        keep = self.kept()
        return Plan(self.feature_names, self.embedding_dim, list(widths),
                    [self._vocab(f)[k[:-1]].clone() for f, k in enumerate(keep)], [bool(k[-1]) for k in keep])

    def to_serving(self) -> list[ServingForm]:
        """Per field a ``keyed`` lookup of the masked rows (pruned rows zero, columns past the eval
        width zero; the OOV row the default): the supernet as it answers in eval mode, at full size.
        The compact form is the retrained table's (``compact.py``)."""
        out = []
        for f, keep in enumerate(self.kept()):
            rows = self.rows.weights(f).detach().clone() * keep[:, None]
            rows[:, int(self.widths[f]):] = 0
            out.append(ServingForm("keyed", {"keys": self._vocab(f).clone(), "rows": rows[:-1].clone(),
                                             "default": rows[-1].clone()}))
        return out

    def memory_bytes(self) -> int:
        """Rows and Adagrad state, vocabularies, thresholds and their Adam state (live tensors)."""
        return self.rows.memory_bytes() + tensor_bytes(self.thresholds, *self.buffers(recurse=False))

    def stats(self) -> dict[str, float]:
        """Rows kept by the thresholds, their share, and the mean threshold."""
        kept = sum(int(k.sum()) for k in self.kept())
        total = sum(self.rows.rows)
        return {"rows": float(total), "rows_kept": float(kept), "kept_fraction": kept / total,
                "threshold_mean": float(self.thresholds.detach().mean()), "memory_bytes": float(self.memory_bytes())}
