"""A raw click log as chunks of byte lines, plain or compressed, and the lines no parser should see.

Compression is recognised by the file's first bytes, not its name: gzip, bz2, zstd and lz4 (frame)
streams are decompressed by Arrow on the fly, so ``train.txt.gz`` converts to the same Parquet as
``train.txt``; a zip or xz file is refused with one line saying to decompress it first. Lines are
split on ``\\n`` only, so line numbers here, in the line count and in every report are the same.

Dirty logs happen (a truncated write, a disk error, a binary record): :func:`screen_lines` finds
the lines that are not UTF-8 text or carry a carriage return inside them, so the converter can
count them as bad rows instead of letting one byte abort the whole file.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

# Stream codecs Arrow decompresses, by magic number (brotli has none, so it is not recognised).
_CODECS = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4"}
_ARCHIVES = {b"PK\x03\x04": "a zip archive", b"\xfd7zXZ\x00": "xz-compressed"}
_SHORT = 60  # characters of a bad value a report shows


class ConversionError(ValueError):
    """The raw log cannot be converted: the message names the file and what is wrong.

    Defined here, below :mod:`recmem.data.convert`, so that reading and parsing raise the one error
    :func:`recmem.data.convert.convert_raw` documents.
    """


def detect_codec(path: Path) -> str | None:
    """The compression of ``path`` (``"gzip"``, ``"bz2"``, ``"zstd"``, ``"lz4"``), None when plain.

    Raises:
        ConversionError: ``path`` is an archive or a compression Arrow cannot stream.
    """
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, what in _ARCHIVES.items():
        if head.startswith(magic):
            raise ConversionError(f"{path}: is {what}, which prepare does not read; decompress it first "
                                  f"(gzip, bz2, zstd and lz4 files are read as they are)")
    codec = next((c for magic, c in _CODECS.items() if head.startswith(magic)), None)
    if codec is not None and not pa.Codec.is_available(codec):
        raise ConversionError(f"{path}: is {codec}-compressed and this pyarrow lacks the codec; decompress it first")
    return codec


@contextmanager
def open_raw(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading bytes, decompressed when :func:`detect_codec` finds a codec.

    Raises:
        ConversionError: the compressed stream is corrupt or truncated (when read inside the block).
    """
    codec = detect_codec(path)
    if codec is None:
        f = open(path, "rb")
    else:
        # Arrow decompresses faster than the gzip module; BufferedReader adds the line iteration it lacks.
        f = io.BufferedReader(pa.input_stream(str(path), compression=codec), buffer_size=1 << 20)
    try:
        with f:
            yield f
    except OSError as e:
        if codec is None:
            raise
        raise ConversionError(f"{path}: cannot decompress ({codec}): {e}") from None


def count_lines(path: Path) -> int:
    """Physical lines in ``path`` after decompression (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with open_raw(path) as f:
        while block := f.read(1 << 24):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def read_header(path: Path) -> str:
    """The first line of ``path`` as text.

    Raises:
        ConversionError: the line is not UTF-8 text.
    """
    with open_raw(path) as f:
        line = f.readline()
    try:
        return line.decode()
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: the header line is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_chunks(path: Path, chunk_rows: int, skip_header: bool) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(0-based index of the first data line, lines)`` for chunks of ``chunk_rows`` lines."""
    with open_raw(path) as f:
        if skip_header:
            f.readline()
        first = 0
        while lines := list(itertools.islice(f, chunk_rows)):
            yield first, lines
            first += len(lines)


def screen_lines(lines: list[bytes], delimiter: str, columns: list[str], needed: set[str]) -> list[tuple[int, str]]:
    """The lines of a chunk a CSV parser must not see, as ``(index in lines, reason)``.

    A line is bad when it holds a carriage return before its end (Arrow would split it into two
    rows) or bytes that are not UTF-8 in a ``needed`` column. Bad bytes in a column the schema does
    not use are harmless, unless the line has the wrong width and so cannot say whose they are.
    This is the slow path (a Python loop): the converter runs it only on a chunk Arrow refused.
    """
    sep = delimiter.encode()
    bad = []
    for i, line in enumerate(lines):
        body = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
        if (cr := body.find(b"\r")) >= 0:
            bad.append((i, f"{_column_at(body, cr, sep, columns)}: carriage return inside the line"))
            continue
        try:
            body.decode()
        except UnicodeDecodeError as e:
            name = _column_at(body, e.start, sep, columns)
            if name in needed or body.count(sep) + 1 != len(columns):
                bad.append((i, f"{name}: not UTF-8 text (byte 0x{body[e.start]:02x})"))
    return bad


def _column_at(body: bytes, offset: int, sep: bytes, columns: list[str]) -> str:
    """The name of the column holding byte ``offset`` of a line (by counting delimiters before it)."""
    index = body.count(sep, 0, offset)
    return columns[index] if index < len(columns) else f"field {index + 1} of {len(columns)}"


def shorten(value: str) -> str:
    """``repr(value)``, cut to a readable length with the full length said."""
    if len(value) <= _SHORT:
        return repr(value)
    return f"{value[:_SHORT]!r}... ({len(value):,} characters)"
