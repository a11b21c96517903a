"""ID populations of one sparse field: Zipf popularity, births and deaths in data time, raw 64-bit IDs.

A field has ``R`` popularity *slots*. Slot ``r`` (rank 1 is the most popular) is drawn with
probability ``q_r ∝ ∫_r^{r+1} x^-alpha dx ≈ r^-alpha`` (Zipf). The ID holding a slot is replaced
every ``L_r`` days, its lifetime::

    L_r = max(min_lifetime, head_lifetime * r^-beta)

so head slots keep one ID for the whole log while tail slots turn over daily: the live ID set drifts,
new IDs keep appearing and old ones stop, which is what TTL expiry is tested on. Each slot starts at a
random phase of its cycle so turnovers are spread out, not synchronised at midnight.

Every (slot, generation) pair is one ID with a flat index ``offset[r] + g`` (``0 <= index < M``); the
ground truth keys its effect tables by that index, the Parquet holds the ID's raw value, a bijective
63-bit mix of (field, index) that looks random and never collides across fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK63 = np.uint64((1 << 63) - 1)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INDEX_BITS = 40


@dataclass(frozen=True)
class Lifecycle:
    """How long IDs live, in days of data time (see the module docstring for the formula)."""

    num_days: float
    head_lifetime_days: float
    lifetime_exponent: float
    min_lifetime_days: float

    def lifetimes(self, ranks: np.ndarray) -> np.ndarray:
        """Lifetime in days of the IDs of each slot; ``ranks`` [R] 1-based -> [R] float64."""
        life = self.head_lifetime_days * ranks.astype(np.float64) ** -self.lifetime_exponent
        return np.maximum(life, self.min_lifetime_days)


@dataclass(frozen=True)
class FieldIds:
    """The ID population of one field.

    Attributes:
        zipf_exponent: alpha of the slot popularity.
        lifetime_days: [R] float64 lifetime of the IDs of each slot.
        inverse_lifetime: [R] float64 ``1 / lifetime_days`` (multiplying is cheaper per row).
        phase: [R] float64 in [0, 1), where in its cycle each slot's ID is at data time 0.
        offset: [R] int64 flat index of each slot's first ID.
        offset_phase: [R] float64 ``offset + phase``: the index of slot r's ID at time t is
            ``floor(t / L_r + offset_phase[r])`` (offset is an integer, so it can go inside the floor,
            which saves a gather per row).
        slot: [M] int64 the slot of each ID.
        raw_ids: [M] int64 raw (non-negative, random-looking) value of each ID.
    """

    zipf_exponent: float
    lifetime_days: np.ndarray
    inverse_lifetime: np.ndarray
    phase: np.ndarray
    offset: np.ndarray
    offset_phase: np.ndarray
    slot: np.ndarray
    raw_ids: np.ndarray

    @property
    def num_ids(self) -> int:
        """M, the number of IDs the field can emit over the whole log."""
        return int(self.raw_ids.shape[0])

    @property
    def num_slots(self) -> int:
        """R, the number of popularity slots."""
        return int(self.lifetime_days.shape[0])

    def slot_probs(self) -> np.ndarray:
        """[R] float64 probability of each slot: what ``sample`` draws (up to its float32 rounding)."""
        edges = np.arange(1, self.num_slots + 2, dtype=np.float64)
        return np.diff(_pareto_cdf(edges, self.zipf_exponent, self.num_slots))

    def sample(self, u: np.ndarray, t_days: np.ndarray) -> np.ndarray:
        """Draw one ID per row.

        The slot is ``floor(X)`` for X Pareto(alpha) truncated to [1, R + 1), drawn by inverting its
        CDF: a discrete Zipf-like law in O(1) per row (a binary search over R slots is 3x slower).

        Args:
            u: [B] float32 uniforms in [0, 1), picking the popularity slot.
            t_days: [B] float64 data time of each row in days since the log's start, in [0, num_days].

        Returns:
            [B] int64 flat ID indices in [0, M).
        """
        slot = np.minimum(_pareto_quantile(u, self.zipf_exponent, self.num_slots), self.num_slots) - 1
        index = t_days * np.take(self.inverse_lifetime, slot) + np.take(self.offset_phase, slot)
        return index.astype(np.int64)

    def share(self, num_days: float) -> np.ndarray:
        """[M] float64 expected share of the field's rows each ID takes in a log of ``num_days`` days.

        An ID is alive for the part of the log its generation overlaps, so an ID born on the last day
        takes a small share even in a popular slot.
        """
        life, phase = self.lifetime_days[self.slot], self.phase[self.slot]  # [M] each
        generation = np.arange(self.num_ids) - self.offset[self.slot]
        born = np.maximum((generation - phase) * life, 0.0)
        died = np.minimum((generation + 1 - phase) * life, num_days)
        return self.slot_probs()[self.slot] * np.maximum(died - born, 0.0) / num_days


def _pareto_cdf(x: np.ndarray, alpha: float, num_slots: int) -> np.ndarray:
    """CDF at ``x`` of the Pareto(alpha) law truncated to [1, num_slots + 1)."""
    if np.isclose(alpha, 1.0):
        return np.log(x) / np.log(num_slots + 1.0)
    return (x ** (1.0 - alpha) - 1.0) / ((num_slots + 1.0) ** (1.0 - alpha) - 1.0)


def _pareto_quantile(u: np.ndarray, alpha: float, num_slots: int) -> np.ndarray:
    """[B] int64 ``floor`` of the inverse of ``_pareto_cdf`` at ``u`` [B] float32.

    float32 ``pow`` is 2.5x faster than float64 and this is the generator's costliest line; its
    rounding (relative error ~1e-6) only moves draws lying next to a slot boundary, which shifts slot
    probabilities by far less than anything the data is used for. The result is >= 1 for every u in
    [0, 1): the base is <= 1 with a negative power, or >= 1 with a positive one.
    """
    if np.isclose(alpha, 1.0):
        return (np.float32(num_slots + 1.0) ** u).astype(np.int64)
    top = np.float32((num_slots + 1.0) ** (1.0 - alpha) - 1.0)
    return ((np.float32(1.0) + u * top) ** np.float32(1.0 / (1.0 - alpha))).astype(np.int64)


def build_field_ids(
    field: int,
    num_ids: int,
    zipf_exponent: float,
    life: Lifecycle,
    key: int,
    rng: np.random.Generator,
) -> FieldIds:
    """Lay out a field whose slots, counting every generation, hold about ``num_ids`` IDs.

    Args:
        field: the field's position, mixed into its raw IDs so fields never share one.
        num_ids: target M (the field's cardinality over the whole log).
        zipf_exponent: alpha of the slot popularity ``q_r ∝ r^-alpha``.
        life: ID lifetimes.
        key: 63-bit key mixed into the raw IDs (seeded, so another seed gives other raw values).
        rng: draws the slots' phases.
    """
    ranks = np.arange(1, num_ids + 1)
    expected_ids = np.cumsum(1.0 + life.num_days / life.lifetimes(ranks))
    # The slot count whose expected ID total is nearest num_ids (+0.5: a 3-ID field keeps 3 slots).
    num_slots = max(1, int(np.searchsorted(expected_ids, num_ids + 0.5, side="right")))
    ranks = ranks[:num_slots]
    lifetime = life.lifetimes(ranks)
    phase = rng.random(num_slots)
    # Generation g of slot r covers t/L_r + phase in [g, g + 1); data time runs over [0, num_days].
    generations = np.floor(life.num_days / lifetime + phase).astype(np.int64) + 1
    offset = np.concatenate([[0], np.cumsum(generations)[:-1]]).astype(np.int64)
    total = int(generations.sum())
    return FieldIds(
        zipf_exponent=zipf_exponent,
        lifetime_days=lifetime,
        inverse_lifetime=1.0 / lifetime,
        phase=phase,
        offset=offset,
        offset_phase=offset + phase,
        slot=np.repeat(np.arange(num_slots), generations),
        raw_ids=mix_ids(field, np.arange(total, dtype=np.int64), key),
    )


def mix_ids(field: int, index: np.ndarray, key: int) -> np.ndarray:
    """Raw ID values: a keyed bijection of ``(field, index)`` onto [0, 2^63).

    Every step (xor with a constant, xor-shift, multiplication by an odd constant mod 2^63) is
    invertible on 63-bit integers, so distinct (field, index) pairs never collide.

    Args:
        field: field position, < 2^23.
        index: [N] int64 flat ID indices, each < 2^40.
        key: 63-bit key.

    Returns:
        [N] int64 non-negative raw IDs.
    """
    x = (np.uint64(field) << np.uint64(_INDEX_BITS)) | index.astype(np.uint64)
    x = (x ^ np.uint64(key)) & _MASK63
    x ^= x >> np.uint64(31)
    x = (x * _MIX1) & _MASK63
    x ^= x >> np.uint64(29)
    x = (x * _MIX2) & _MASK63
    x ^= x >> np.uint64(32)
    return x.astype(np.int64)
