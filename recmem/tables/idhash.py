"""64-bit ID hashing shared by the collisionless kernels: bucket placement, filter counters, row init,
and ID ownership across workers.

Raw IDs can be any int64 (negative included), often with structure (sequential, shared prefixes), so
every use goes through a strong 64-bit finalizer rather than the raw bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# 2**-53: turns the top 53 bits of a hash into a uniform double in [0, 1).
_UNIT = 1.0 / 9007199254740992.0
# A fixed salt so worker ownership is independent of every table's bucket placement.
_OWNER_SALT = np.int64(0x5DEECE66D)


@njit(cache=True, inline="always")
def mix64(x: np.int64) -> np.uint64:
    """MurmurHash3's 64-bit finalizer: a bijection on 64 bits with full avalanche."""
    z = np.uint64(x)
    z ^= z >> _S33
    z *= _M1
    z ^= z >> _S33
    z *= _M2
    z ^= z >> _S33
    return z


@njit(cache=True, inline="always")
def salted(key: np.int64, salt: np.int64) -> np.uint64:
    """The hash of ``key`` under a per-(table, feature) ``salt``."""
    return mix64(np.int64(np.uint64(key) ^ mix64(salt)))


@njit(cache=True, inline="always")
def derive(h: np.uint64, j: int) -> np.uint64:
    """The ``j``-th of a family of independent hashes derived from hash ``h``."""
    return mix64(np.int64(h + np.uint64(j + 1) * _GOLDEN))


@njit(cache=True, inline="always")
def unit_float(h: np.uint64, j: int) -> float:
    """The ``j``-th uniform double in [0, 1) drawn from hash ``h`` (deterministic)."""
    return np.float64(derive(h, j) >> np.uint64(11)) * _UNIT


def feature_salts(seed: int, num_features: int) -> np.ndarray:
    """One salt per feature of a table: [F] int64, fixed by ``seed`` and the feature's position."""
    mixed = (np.arange(num_features, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    return (mixed ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)).view(np.int64)


@njit(cache=True)
def shard_of(values: np.ndarray, num_shards: int) -> np.ndarray:
    """The worker that owns each ID when a table is sharded by ID.

    Args:
        values: [N] int64 raw IDs.
        num_shards: number of workers.

    Returns:
        [N] int64 in [0, num_shards): a hash of the ID alone, so every worker routes an ID to the
        same owner (for an all-to-all exchange) and owners get near-equal shares of any ID stream.
    """
    out = np.empty(values.shape[0], dtype=np.int64)
    n = np.uint64(num_shards)
    for i in range(values.shape[0]):
        out[i] = np.int64((salted(values[i], _OWNER_SALT) >> np.uint64(32)) % n)
    return out
