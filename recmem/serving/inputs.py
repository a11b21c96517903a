"""Raw feature rows (what a client sends as JSON) -> the tensors a bundle's model takes.

This repeats, value by value and with the standard library only, what ``recmem prepare`` does to a
raw log (``recmem/data/convert.py`` and ``recmem/data/ids.py``), so a served row meets the model as
its training rows did:

- a dense field: a number ``x`` becomes ``log(1 + max(x, 0))`` (float32); null or missing -> 0.
- a sparse field: an int is taken as the stored raw int64 ID (synthetic data, Parquet written by
  other tools); a string goes through the bundle's ``sparse_strings`` rule: ``hex`` parses 1 to 15
  hex digits (Criteo's hashed categories, ``"68fd1e64"``), ``hash`` hashes the text as
  ``ids.hash_strings`` does; null, a missing field or ``""`` is the missing ID (-1), which has a row
  of its own like any ID. A list of those values is a multi-hot bag.

Anything else is an :class:`InputError` naming the row and the field.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from typing import Any

import numpy as np
import torch

MISSING_ID = -1
"""The raw ID of a missing categorical value (the same as ``recmem.data.ids.MISSING_ID``)."""

_HEX = re.compile(r"[0-9a-fA-F]{1,15}")
_INT64 = (-(2**63), 2**63 - 1)


class InputError(ValueError):
    """Rows a bundle cannot score; the message names the row index and the field."""


def parse_rows(rows: Any, dense_names: list[str], sparse_names: list[str], label: str, sparse_strings: str,
               max_rows: int | None = None, max_bag: int = 1024, fill_missing: bool = False,
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Validate and convert raw rows.

    Args:
        rows: a list of dicts ``{field: value}``; the label field may be present and is ignored.
        dense_names, sparse_names, label: the bundle's schema.
        sparse_strings: ``"hex"`` or ``"hash"`` (see the module docstring).
        max_rows: refuse more rows than this (None: no limit).
        max_bag: most IDs in one multi-hot bag.
        fill_missing: a field absent from a row counts as null; False: an absent field is an error.

    Returns:
        dense [B, n_dense] float32 (transformed), and per sparse feature values [N_f] int64 and
        lengths [B] int64.

    Raises:
        InputError: naming the row and field at fault.
    """
    if not isinstance(rows, list):
        raise InputError(f"rows must be a list of objects, got {type(rows).__name__}")
    if max_rows is not None and len(rows) > max_rows:
        raise InputError(f"{len(rows)} rows is more than the limit of {max_rows} per request")
    known = set(dense_names) | set(sparse_names) | {label}
    # One pass in plain Python lists, one conversion to arrays at the end: setting tensor elements one
    # by one cost more than the model's forward pass at 256 rows. Common values (numbers, int IDs)
    # take the inline path; anything else goes through the checks that name the row and field.
    raw: list[Any] = []
    values: list[list[int]] = [[] for _ in sparse_names]
    lengths: list[list[int]] = [[] for _ in sparse_names]
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise InputError(f"row {i}: expected an object of fields, got {type(row).__name__}")
        if not known.issuperset(row):
            unknown = [k for k in row if k not in known]
            raise InputError(f"row {i}: unknown field {str(unknown[0])[:64]!r}")
        for name in dense_names:
            x = row[name] if name in row else _field(row, name, i, fill_missing)
            raw.append(x if type(x) is float or type(x) is int else _dense_raw(x, i, name))
        for f, name in enumerate(sparse_names):
            x = row[name] if name in row else _field(row, name, i, fill_missing)
            if type(x) is int and _INT64[0] <= x <= _INT64[1]:
                values[f].append(x)
                lengths[f].append(1)
            else:
                bag = _bag(x, i, name, sparse_strings, max_bag)
                values[f].extend(bag)
                lengths[f].append(len(bag))
    return (_dense_array(raw, len(rows), dense_names), [torch.tensor(v, dtype=torch.int64) for v in values],
            [torch.tensor(n, dtype=torch.int64) for n in lengths])


def _dense_array(raw: list, n_rows: int, dense_names: list[str]) -> torch.Tensor:
    """Raw dense numbers (row-major) -> log(1 + max(x, 0)) [B, n_dense] float32, or the first bad one named."""
    try:
        x = np.asarray(raw, dtype=np.float64).reshape(n_rows, len(dense_names))  # [B, n_dense]
        finite = bool(np.isfinite(x).all())
    except (OverflowError, ValueError, TypeError):
        finite = False
    if not finite:
        for k, v in enumerate(raw):
            _dense(v, k // len(dense_names), dense_names[k % len(dense_names)])
        raise InputError("dense values are not all finite numbers")
    return torch.from_numpy(np.log1p(np.maximum(x, 0.0)).astype(np.float32))


def _field(row: dict, name: str, i: int, fill_missing: bool) -> Any:
    if name in row:
        return row[name]
    if fill_missing:
        return None
    raise InputError(f"row {i}: missing field {name!r} (send null for a missing value)")


def _dense_raw(x: Any, i: int, name: str) -> float:
    """A dense value that is not a plain float or int: null -> 0 (log1p(0) = 0), else an error."""
    if x is None:
        return 0.0
    _dense(x, i, name)  # raises, naming the row and field, for anything but a finite number
    return float(x)


def _dense(x: Any, i: int, name: str) -> float:
    if x is None:
        return 0.0
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InputError(f"row {i}: field {name!r}: expected a number or null, got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:
        raise InputError(f"row {i}: field {name!r}: number out of range") from None
    if not math.isfinite(x):
        raise InputError(f"row {i}: field {name!r}: {x} is not a finite number")
    return math.log1p(max(x, 0.0))


def _bag(x: Any, i: int, name: str, sparse_strings: str, max_bag: int) -> list[int]:
    if isinstance(x, list):
        if len(x) > max_bag:
            raise InputError(f"row {i}: field {name!r}: a bag of {len(x)} IDs is more than {max_bag}")
        return [_id(v, i, name, sparse_strings) for v in x]
    return [_id(x, i, name, sparse_strings)]


def _id(x: Any, i: int, name: str, sparse_strings: str) -> int:
    if x is None:
        return MISSING_ID
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise InputError(f"row {i}: field {name!r}: expected an ID (string or integer) or null, "
                         f"got {type(x).__name__}")
    if isinstance(x, int):
        if not _INT64[0] <= x <= _INT64[1]:
            raise InputError(f"row {i}: field {name!r}: integer ID out of the int64 range")
        return x
    if x == "":
        return MISSING_ID
    if sparse_strings == "hash":
        return hash_string(x)
    if not _HEX.fullmatch(x):
        raise InputError(f"row {i}: field {name!r}: {x[:40]!r} is not 1 to 15 hex digits")
    return int(x, 16)


_MASK = (1 << 64) - 1
_PANDAS_KEY = b"0123456789123456"  # pandas.util.hash_array's default hash_key


@functools.lru_cache(maxsize=1 << 16)
def hash_string(text: str) -> int:
    """The ID ``recmem.data.ids.hash_strings`` gives ``text``: pandas' SipHash-2-4 of its UTF-8
    bytes under pandas' fixed key, pandas' 64-bit mix, top bit cleared.

    Cached (65,536 strings, a few MB): pure-Python SipHash costs ~10 us a string, and served
    categories repeat."""
    h = _siphash24(_PANDAS_KEY, text.encode("utf-8"))
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _MASK
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _MASK
    h ^= h >> 31
    return h & 0x7FFF_FFFF_FFFF_FFFF


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _siphash24(key: bytes, data: bytes) -> int:
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & _MASK
            v[1] = _rotl(v[1], 13) ^ v[0]
            v[0] = _rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & _MASK
            v[3] = _rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & _MASK
            v[3] = _rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & _MASK
            v[1] = _rotl(v[1], 17) ^ v[2]
            v[2] = _rotl(v[2], 32)

    tail = len(data) % 8
    for (m,) in struct.iter_unpack("<Q", data[: len(data) - tail]):
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    last = (len(data) & 0xFF) << 56 | int.from_bytes(data[len(data) - tail:], "little")
    v[3] ^= last
    rounds(2)
    v[0] ^= last
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]
