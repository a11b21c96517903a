"""The hidden ground-truth CTR model that labels synthetic rows.

For a row with dense features ``x`` (standardised to ``z``) and one ID per sparse field::

    logit = bias + sum_f w_f(id_f)                     first-order effects
                 + sum_{f<g} <v_f(id_f), v_g(id_g)>    pairwise latent interactions (FM / DLRM dot)
                 + <a, z> + <P z, sum_f v_f(id_f)>      dense effects and dense x sparse interactions

Latent vectors ``v`` have ``latent_dim`` entries, so a DLRM with dot interaction and embeddings at
least that wide can represent the truth exactly.

What keeps the truth learnable from a log of a few 100k rows: an ID's ``w`` and ``v`` are scaled by
``share / (share + half_share)``, its expected share of the field's rows, so a tail ID seen a handful
of times carries almost no signal (instead of noise no model could fit). At the default half share
(3% of the field's rows) only a field's few dozen head IDs keep most of their effect, which a hashed
table of a few hundred rows per field still separates: hash collisions then cost almost nothing.
A half point in training rows (``effect_half_rows``, see :func:`half_points`) gives every ID seen a
few dozen times its own effect, thousands per large field. Latent vectors are
larger in small fields (see :func:`field_scales`). What keeps the interactions essential: latent
vectors are centred on their usage-weighted mean, so the pairwise term has no first-order part a
logistic regression on one-hot IDs could pick up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from recmem.config import SyntheticConfig
from recmem.data.synthetic.dense import DenseModel, build_dense
from recmem.data.synthetic.ids import FieldIds, Lifecycle, build_field_ids


@dataclass(frozen=True)
class FieldEffects:
    """One field's IDs and their effects.

    Attributes:
        ids: the field's ID population.
        packed: [M, 1 + K] float32, per ID ``[w - |v|^2 / 2, v]`` for first-order effect ``w`` and
            latent vector ``v``: one gather per field gives everything the logit needs of it.
    """

    ids: FieldIds
    packed: np.ndarray

    @classmethod
    def pack(cls, ids: FieldIds, weight: np.ndarray, latent: np.ndarray) -> FieldEffects:
        """Effects from ``weight`` [M] and ``latent`` [M, K]."""
        packed = np.empty((len(weight), 1 + latent.shape[1]), dtype=np.float32)  # [M, 1+K]
        packed[:, 0] = weight - 0.5 * np.einsum("mk,mk->m", latent, latent)
        packed[:, 1:] = latent
        return cls(ids=ids, packed=packed)

    @property
    def latent(self) -> np.ndarray:
        """[M, K] float32 latent vector of each ID."""
        return self.packed[:, 1:]

    @property
    def weight(self) -> np.ndarray:
        """[M] float32 first-order effect of each ID."""
        return self.packed[:, 0] + 0.5 * np.einsum("mk,mk->m", self.latent, self.latent)

    def scaled(self, first: float, latent: float) -> FieldEffects:
        """This field with first-order effects times ``first`` and latent vectors times ``latent``."""
        weight, vectors = self.weight * np.float32(first), self.latent * np.float32(latent)
        return FieldEffects.pack(self.ids, weight, vectors)


@dataclass(frozen=True)
class Rows:
    """A drawn block of B rows before labelling.

    Attributes:
        dense: [B, n_dense] float32 transformed dense features.
        standard: [B, n_dense] float32 the same, standardised (what the effects read).
        index: [F, B] int64 flat ID index of each field's ID (see ``FieldIds``).
        logit: [B] float32 ground-truth logit, bias included.
    """

    dense: np.ndarray
    standard: np.ndarray
    index: np.ndarray
    logit: np.ndarray


@dataclass(frozen=True)
class GroundTruth:
    """Everything that decides a row's features and click probability.

    Attributes:
        fields: per sparse field, its IDs and effects.
        dense: the dense features' distribution and effects.
        bias: global logit offset, calibrated to the configured positive rate.
    """

    fields: list[FieldEffects]
    dense: DenseModel
    bias: float

    def draw(self, rng: np.random.Generator, t_days: np.ndarray) -> Rows:
        """Draw the features of B rows at the given data times and compute their logits.

        Args:
            rng: the rows' random stream.
            t_days: [B] float64 data time of each row, in days since the log's start.
        """
        dense, standard = self.dense.draw(rng, len(t_days))
        uniforms = rng.random((len(self.fields), len(t_days)), dtype=np.float32)  # [F, B]
        index = np.stack([f.ids.sample(u, t_days) for f, u in zip(self.fields, uniforms)])
        logit = self.bias + self.logit_terms(index, standard)
        return Rows(dense=dense, standard=standard, index=index, logit=logit)

    def logit_terms(self, index: np.ndarray, standard: np.ndarray) -> np.ndarray:
        """The logit without the bias: the sum of :meth:`components`, computed the fast way.

        Args:
            index: [F, B] int64 flat ID indices.
            standard: [B, n_dense] float32 standardised dense features.

        Returns:
            [B] float32.
        """
        sums = np.zeros((index.shape[1], self.fields[0].packed.shape[1]), dtype=np.float32)  # [B, 1+K]
        for f, idx in zip(self.fields, index):
            sums += np.take(f.packed, idx, axis=0)
        total = sums[:, 1:]  # [B, K] sum_f v_f
        # sum_{f<g} <v_f, v_g> = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2; the packed tables carry the
        # -|v_f|^2 / 2 part, so the pairs cost O(F K) per row instead of O(F^2 K).
        pairs = 0.5 * np.einsum("bk,bk->b", total, total)
        cross = np.einsum("bk,bk->b", standard @ self.dense.project, total)
        return sums[:, 0] + pairs + standard @ self.dense.weight + cross

    def components(self, index: np.ndarray, standard: np.ndarray) -> dict[str, np.ndarray]:
        """The logit's four terms, each [B] float32: ``first_order``, ``interaction`` (the pairs),
        ``dense`` and ``dense_interaction`` (see the module docstring). Same inputs as
        :meth:`logit_terms`."""
        first = np.zeros(index.shape[1], dtype=np.float32)
        total = np.zeros((index.shape[1], self.fields[0].latent.shape[1]), dtype=np.float32)  # [B, K]
        squares = np.zeros(index.shape[1], dtype=np.float32)
        for f, idx in zip(self.fields, index):
            first += f.weight[idx]
            v = f.latent[idx]  # [B, K]
            total += v
            squares += np.einsum("bk,bk->b", v, v)
        return {
            "first_order": first,
            "interaction": 0.5 * (np.einsum("bk,bk->b", total, total) - squares),
            "dense": standard @ self.dense.weight,
            "dense_interaction": np.einsum("bk,bk->b", standard @ self.dense.project, total),
        }


def field_effects(
    ids: FieldIds,
    share: np.ndarray,
    first_scale: float,
    latent_scale: float,
    latent_dim: int,
    half_shares: tuple[float, float],
    rng: np.random.Generator,
) -> FieldEffects:
    """Draw the effects of one field's IDs, shrunk by rarity (see the module docstring).

    Args:
        ids: the field's IDs.
        share: [M] float64 expected row share of each ID.
        first_scale: spread of the first-order effects of the field's common IDs.
        latent_scale: typical norm of the latent vectors of the field's common IDs.
        latent_dim: K.
        half_shares: the shares at which an ID gets half its full first-order and latent effect.
        rng: draws the effects.
    """
    shrink_first, shrink_latent = (
        (share / (share + half)).astype(np.float32) for half in half_shares
    )  # [M] each
    latent = rng.standard_normal((ids.num_ids, latent_dim), dtype=np.float32)  # [M, K]
    usage = (share * shrink_latent).astype(np.float32)
    latent -= usage @ latent / usage.sum()
    latent *= (np.float32(latent_scale / np.sqrt(latent_dim)) * shrink_latent)[:, None]
    weight = rng.standard_normal(ids.num_ids, dtype=np.float32)  # [M]
    weight *= np.float32(first_scale) * shrink_first
    return FieldEffects.pack(ids, weight, latent)


def calibrate_bias(logit_terms: np.ndarray, positive_rate: float) -> float:
    """The bias b with mean(sigmoid(logit_terms + b)) == positive_rate (Newton's method).

    Args:
        logit_terms: [N] bias-free logits of a pilot sample of rows.
        positive_rate: the target, in (0, 1).
    """
    logit_terms = logit_terms.astype(np.float64)
    bias = float(np.log(positive_rate / (1.0 - positive_rate)))
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(logit_terms + bias)))
        gap = p.mean() - positive_rate
        if abs(gap) < 1e-9:
            break
        bias -= gap / max(float((p * (1.0 - p)).mean()), 1e-12)
    return bias


def scaled_cardinalities(cfg: SyntheticConfig) -> list[int]:
    """Per sparse field, the number of IDs the generator lays out (see ``SyntheticConfig``)."""
    pivot, power = cfg.cardinality_pivot, cfg.cardinality_exponent
    return [c if c <= pivot else round(pivot * (c / pivot) ** power) for c in cfg.cardinalities]


def field_scales(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """[2, F] how much each field's first-order effects (row 0) and latent vectors (row 1) weigh.

    Fields differ in how much they matter: log-normal factors with ``field_importance_spread``.
    Latent vectors also scale as ``cardinality ** -interaction_cardinality_exponent``: the crosses
    of small fields (device x site category) carry most interactions, which a model learns from a
    quickstart-sized log, while a 300k-ID field's crosses would need far more rows. Each row has a
    root mean square of 1 over fields; :func:`build_truth` sets the absolute sizes.
    """
    scales = np.exp(cfg.field_importance_spread * rng.standard_normal((2, len(cfg.cardinalities))))
    sizes = np.asarray(scaled_cardinalities(cfg), dtype=np.float64)
    scales[1] *= sizes**-cfg.interaction_cardinality_exponent
    return scales / np.sqrt((scales**2).mean(axis=1, keepdims=True))


def half_points(cfg: SyntheticConfig) -> tuple[float, float]:
    """The shares at which an ID gets half its first-order and half its latent effect.

    ``*_half_share`` as configured, or, where ``*_half_rows`` is above 0, that many rows of the
    training split as a share of it (an ID's expected training rows are its share times
    ``train_rows``): a half point in rows keeps every ID seen that often as informative whatever
    the log's size, so a field's tail carries signal a model can learn and a hashed table loses.
    """
    return tuple(rows / cfg.train_rows if rows > 0 else share for rows, share in (
        (cfg.effect_half_rows, cfg.effect_half_share), (cfg.interaction_half_rows, cfg.interaction_half_share)))


def build_truth(cfg: SyntheticConfig, pilot_rows: int = 20_000) -> GroundTruth:
    """Draw the ground truth a config and its seed describe (deterministic).

    Effects are drawn at unit scale, then rescaled on ``pilot_rows`` rows spread over the log so that
    each term of the logit has the configured standard deviation over rows (``first_order_std``,
    ``interaction_std``, ``dense_std``, ``dense_interaction_std``), whatever the seed drew; the bias
    then makes the mean true probability ``positive_rate``.
    """
    rng = np.random.default_rng([cfg.seed, 0])
    life = Lifecycle(cfg.num_days, cfg.head_lifetime_days, cfg.lifetime_exponent, cfg.min_lifetime_days)
    key = int(rng.integers(0, 1 << 63))
    scales = field_scales(cfg, rng)
    half_shares = half_points(cfg)
    fields = []
    for f, num_ids in enumerate(scaled_cardinalities(cfg)):
        ids = build_field_ids(f, num_ids, cfg.zipf_exponent, life, key, rng)
        share = ids.share(cfg.num_days)
        effects = field_effects(ids, share, scales[0, f], scales[1, f], cfg.latent_dim, half_shares, rng)
        fields.append(effects)
    dense = build_dense(cfg.dense_missing, cfg.latent_dim, rng)
    unit = GroundTruth(fields=fields, dense=dense, bias=0.0)
    pilot = unit.draw(rng, rng.uniform(0.0, cfg.num_days, pilot_rows))
    truth = _rescaled(unit, unit.components(pilot.index, pilot.standard), cfg)
    bias = calibrate_bias(truth.logit_terms(pilot.index, pilot.standard), cfg.positive_rate)
    return dataclasses.replace(truth, bias=bias)


def _rescaled(unit: GroundTruth, terms: dict[str, np.ndarray], cfg: SyntheticConfig) -> GroundTruth:
    """``unit`` with each logit term scaled to its configured std (``terms`` measured on a pilot)."""

    def factor(target: float, measured: float) -> float:
        return target / measured if measured > 0.0 else 0.0

    first = factor(cfg.first_order_std, float(terms["first_order"].std()))
    # The pairs are quadratic in the latent vectors, the dense x sparse term linear in them.
    latent = np.sqrt(factor(cfg.interaction_std, float(terms["interaction"].std())))
    cross = factor(cfg.dense_interaction_std, latent * float(terms["dense_interaction"].std()))
    dense = dataclasses.replace(
        unit.dense,
        weight=unit.dense.weight * np.float32(factor(cfg.dense_std, float(terms["dense"].std()))),
        project=unit.dense.project * np.float32(cross),
    )
    return GroundTruth(fields=[f.scaled(first, latent) for f in unit.fields], dense=dense, bias=0.0)
