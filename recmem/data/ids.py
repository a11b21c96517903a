"""Categorical values -> raw int64 IDs: hex parsing, stable string hashing, and the missing-value ID.

Every sparse column in recmem's Parquet holds raw int64 IDs. Criteo's categories are already hashed
to 8 hex digits, so they parse losslessly into integers; any other string (Avazu's site ids, a user's
free-text categories) is hashed. Both paths work on whole Arrow arrays, never value by value in Python.
Parsed and hashed IDs are always >= 0, so they can never collide with :data:`MISSING_ID`.
:func:`sparse_arrays` reads a stored sparse column back as IDs, the one place nulls become missing IDs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MISSING_ID = -1
"""The raw ID of a missing categorical value (an empty field in the log, a null in Parquet)."""

MAX_HEX_DIGITS = 15
"""Longer hex strings would not fit a non-negative int64 (16 digits can reach the sign bit)."""

Sparse = tuple[np.ndarray, np.ndarray]
"""A sparse column as ``(values [sum(lengths)] int64, lengths [B] int32)``."""

_POSITIVE_63_BITS = np.int64(0x7FFF_FFFF_FFFF_FFFF)


def _hex_lookup() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    for digit, char in enumerate("0123456789abcdef"):
        table[ord(char)] = digit
        table[ord(char.upper())] = digit
    return table


def parse_hex(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Parse hex strings (``"68fd1e64"``) into int64 IDs, vectorised over the whole array.

    Empty strings and nulls become :data:`MISSING_ID`. A value that is not 1..15 ASCII hex digits
    is flagged bad (its ID is then meaningless and the caller drops the row).

    Args:
        values: [N] string array.

    Returns:
        ``(ids, bad)``: ids [N] int64, bad [N] bool.
    """
    values = _as_array(values).fill_null("")
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    byte_lengths = pc.binary_length(values)
    lengths = byte_lengths.to_numpy(zero_copy_only=False)
    fits = pc.and_(pc.string_is_ascii(values), pc.less_equal(byte_lengths, MAX_HEX_DIGITS))
    fits_np = fits.to_numpy(zero_copy_only=False)
    width = int(lengths[fits_np].max(initial=0)) or 1
    width += width % 2
    # Left-padding with "0" to an even width makes the data buffer an [N, width] byte matrix; pairs of
    # hex digits then pack into bytes, and 8 big-endian bytes are one integer: no per-digit loop.
    padded = pc.utf8_lpad(pc.if_else(fits, values, ""), width=width, padding="0")
    digits = _hex_lookup()[_fixed_width_bytes(padded, width)]  # [N, width], 255 where not hex
    not_hex = (digits == 255).any(axis=1)
    packed = np.zeros((n, 8), dtype=np.uint8)  # [N, 8] big-endian bytes of each ID
    packed[:, 8 - width // 2 :] = (digits[:, 0::2] << 4) | digits[:, 1::2]
    ids = packed.view(">u8").reshape(n).astype(np.int64)
    bad = ~fits_np | not_hex
    ids[bad] = 0
    ids[lengths == 0] = MISSING_ID
    return ids, bad


def hash_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hash arbitrary strings to non-negative int64 IDs, identically in every process and run.

    Only the distinct values are hashed (SipHash with pandas' fixed key), then broadcast back by
    dictionary index, so the cost scales with the number of distinct strings. Empty strings and
    nulls become :data:`MISSING_ID`.

    Args:
        values: [N] string array.

    Returns:
        [N] int64 IDs.
    """
    values = _as_array(values).fill_null("")
    encoded = pc.dictionary_encode(values)
    uniques = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    # The top bit is cleared so hashed IDs stay >= 0 and never equal MISSING_ID.
    hashed = pd.util.hash_array(uniques, categorize=False).view(np.int64) & _POSITIVE_63_BITS
    ids = hashed[encoded.indices.to_numpy(zero_copy_only=False)]
    ids[pc.equal(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)] = MISSING_ID
    return ids


def sparse_arrays(column: pa.Array | pa.ChunkedArray) -> Sparse:
    """An Arrow sparse column as ``(values int64, lengths int32)``; nulls -> ``MISSING_ID``.

    Args:
        column: [B] integer IDs, or [B] ``list<integer>`` bags (a null list is an empty bag).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int32)
        column = pc.list_flatten(column)
    else:
        lengths = np.ones(len(column), dtype=np.int32)
    if column.null_count:
        column = pc.fill_null(column, MISSING_ID)
    return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), lengths


def _as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return array.cast(pa.string())


def _fixed_width_bytes(strings: pa.Array, width: int) -> np.ndarray:
    """The data buffer of a string array whose values all have ``width`` bytes, as [N, width]."""
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int32)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(strings.buffers()[2], dtype=np.uint8)
    return data[offsets[0] : offsets[-1]].reshape(n, width)
