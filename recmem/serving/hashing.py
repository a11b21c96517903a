"""Hashing of raw IDs into buckets that training and serving compute alike, in plain torch.

Kinds that hash raw IDs (``multihash``, the hashed out-of-vocabulary rows of ``full`` and ``qr``)
need the very same buckets in the trainer and in a server that has only torch. Each hash is a
polynomial over the ID's four 16-bit chunks modulo the prime ``P = 2**31 - 1``, with a multiplier
and an offset drawn from a seed: every product stays below ``2**62``, so int64 arithmetic never
overflows and the result is the same on every machine and process. Two distinct IDs collide under
a random multiplier with probability at most ``4 / P`` before the final ``mod n``.
"""

from __future__ import annotations

import torch

PRIME = (1 << 31) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    """SplitMix64's output function on a Python int (a fixed bijection on 64 bits)."""
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def hash_params(seed: int, index: int) -> tuple[int, int]:
    """The (multiplier in [1, P), offset in [0, P)) of hash number ``index`` of a family fixed by ``seed``."""
    base = _splitmix((seed & _MASK) ^ _splitmix(index))
    return 1 + _splitmix(base) % (PRIME - 1), _splitmix(base + 1) % PRIME


def hash_ids(values: torch.Tensor, multiplier: int, offset: int) -> torch.Tensor:
    """[N] int64 raw IDs (any sign) -> [N] int64 hashes in [0, P)."""
    h = torch.full_like(values, offset)
    for shift in (48, 32, 16, 0):  # the ID's 16-bit chunks, high to low; >> then & keeps the raw bits
        chunk = (values >> shift) & 0xFFFF
        h = (h * multiplier + chunk + 1) % PRIME  # < 2**31 * 2**31: no int64 overflow
    return (h * multiplier + offset) % PRIME  # one more round, so the last chunk is mixed too


def buckets(values: torch.Tensor, multiplier: int, offset: int, n: int) -> torch.Tensor:
    """[N] int64 raw IDs -> [N] int64 buckets in [0, n)."""
    return hash_ids(values, multiplier, offset) % n
