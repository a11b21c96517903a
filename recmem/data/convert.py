"""Raw click logs (Criteo TSV, CSV with a header) -> recmem's Parquet layout, streaming.

The file is read ``chunk_rows`` lines at a time, so memory is bounded by one chunk whatever the file
size. A cheap first pass counts lines, which fixes the train/valid split by position (click logs are
time-ordered, so the tail is the most honest validation set) and the progress bar's total.

Output under ``out_root``: ``train/part-*.parquet`` and ``valid/part-*.parquet`` with columns
``label`` float32, each dense field float32 as DLRM transforms it (``log(1 + max(x, 0))``, missing -> 0),
each sparse field int64 raw ID (missing -> ``MISSING_ID``), and ``event_time`` int64 seconds when the
raw log has that column. Malformed rows (wrong width, bad values, bytes that are not UTF-8 text,
blank lines) are counted, reported by line number and column and skipped; too many of them fail the
conversion rather than quietly training on a broken file. Reading, compressed files included, is
:mod:`recmem.data.rawfile`'s job.

Guarantees: the previous ``train/``, ``valid/`` and ``stats/`` under ``out_root`` stay as they were
unless the whole file converts to at least one row; the temporary output of a failed run is removed.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from recmem.config import RawConfig, SchemaConfig
from recmem.data.ids import hash_strings, parse_hex
from recmem.data.layout import PartWriter
from recmem.data.rawfile import ConversionError, count_lines, read_chunks, read_header, screen_lines, shorten

_MAX_REPORTED = 10
# Number syntax Arrow's string casts accept (a subset of it), used to find the culprits when a cast fails.
_FLOAT = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
_INT = r"^-?\d{1,18}$"

__all__ = ["BadLine", "ConversionError", "ConversionReport", "convert_raw"]


@dataclass(frozen=True)
class BadLine:
    """A skipped raw line: 1-based line number in the file and why it was skipped."""

    line: int
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_raw` did.

    Attributes:
        path: the raw file.
        rows_read: data lines read (header excluded, bad lines included).
        rows_written: rows written per split, ``{"train": n, "valid": m}``.
        bad_rows: lines skipped as malformed.
        first_bad: the first few skipped lines, in file order.
        seconds: wall time of the conversion.
    """

    path: Path
    rows_read: int = 0
    rows_written: dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0})
    bad_rows: int = 0
    first_bad: list[BadLine] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        """Conversion speed in data lines per second."""
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def describe_bad(self) -> str:
        """The first bad lines as ``line N: reason`` text, one per line."""
        return "\n".join(f"  line {b.line}: {b.reason}" for b in self.first_bad)

    def __str__(self) -> str:
        text = (
            f"converted {self.path}: {self.rows_read:,} rows in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s); "
            f"train {self.rows_written['train']:,}, valid {self.rows_written['valid']:,}, bad {self.bad_rows:,}"
        )
        return f"{text}; first bad lines:\n{self.describe_bad()}" if self.first_bad else text


def convert_raw(raw: RawConfig, schema: SchemaConfig, out_root: Path, progress: bool = True) -> ConversionReport:
    """Convert the raw log ``raw.path`` into ``out_root/{train,valid}/part-*.parquet``.

    Existing ``train/``, ``valid/`` and (now stale) ``stats/`` under ``out_root`` are replaced only
    once the whole file has converted; a failed conversion leaves them untouched.

    Args:
        raw: the raw file, its format, the split and the bad-row tolerance.
        schema: which columns are the label, dense, sparse and (optional) event-time fields.
        out_root: the data root to write.
        progress: show a tqdm bar.

    Raises:
        ConversionError: a missing, empty, archived or corrupt compressed file, missing columns, no
            row converted, or more bad rows than ``raw.max_bad_fraction`` allows (naming the count
            and the first bad lines).
    """
    start = time.perf_counter()
    _check_options(raw)
    _undo_interrupted_swap(Path(out_root))
    path = Path(raw.path)
    if not path.is_file():
        raise ConversionError(f"{path}: raw data file not found (data.raw.path)")
    columns = _raw_columns(path, raw, schema)
    has_time = schema.event_time is not None and schema.event_time in columns
    total = max(0, count_lines(path) - int(raw.header))
    if total == 0:
        what = "empty but for its header" if raw.header else "empty"
        raise ConversionError(f"{path}: no data lines (the file is {what}); {out_root} is left as it was")
    split_at = total - _valid_rows(raw, total)
    report = ConversionReport(path=path, rows_read=total)
    tmp = Path(out_root) / ".convert-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {s: PartWriter(tmp / s, _output_schema(schema, has_time), raw.part_rows) for s in ("train", "valid")}
    try:
        with tqdm(total=total, unit="rows", desc=f"convert {path.name}", disable=not progress) as bar:
            for first, lines in read_chunks(path, raw.chunk_rows, raw.header):
                table, line_index, bad = _parse_chunk(lines, first, columns, raw, schema, has_time)
                _record_bad(report, bad, total, raw)
                # Good rows are in line order, so the split is one cut: two views, no copies.
                cut = int(np.searchsorted(line_index, split_at))
                writers["train"].write({name: values[:cut] for name, values in table.items()})
                writers["valid"].write({name: values[cut:] for name, values in table.items()})
                bar.update(len(lines))
        for split, writer in writers.items():
            report.rows_written[split] = writer.close()
        if not sum(report.rows_written.values()):
            raise ConversionError(f"{path}: none of its {total:,} rows converted; {out_root} is left as it was; "
                                  f"first bad lines:\n{report.describe_bad()}")
        _replace_outputs(Path(out_root), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _check_options(raw: RawConfig) -> None:
    ranges = {
        "chunk_rows": raw.chunk_rows >= 1,
        "part_rows": raw.part_rows >= 1,
        "valid_rows": raw.valid_rows >= 0,
        "valid_fraction": 0.0 <= raw.valid_fraction <= 1.0,
        "max_bad_fraction": 0.0 <= raw.max_bad_fraction <= 1.0,
    }
    for name, ok in ranges.items():
        if not ok:
            raise ConversionError(f"data.raw.{name}: {getattr(raw, name)!r} is out of range")


def _raw_columns(path: Path, raw: RawConfig, schema: SchemaConfig) -> list[str]:
    """The raw file's column names: ``raw.columns``, else its header, else label + dense + sparse."""
    if raw.columns:
        columns = list(raw.columns)
    elif raw.header:
        columns = next(csv.reader([read_header(path)], delimiter=raw.delimiter), [])
        columns = [c.strip() for c in columns]
    else:
        columns = [schema.label, *schema.dense, *schema.sparse]
    missing = [c for c in (schema.label, *schema.dense, *schema.sparse) if c not in columns]
    if missing:
        raise ConversionError(f"{path}: schema columns {missing} are not in the raw columns {columns}")
    return columns


def _valid_rows(raw: RawConfig, total: int) -> int:
    if raw.valid_rows > 0:
        return min(raw.valid_rows, total)
    return int(round(total * raw.valid_fraction))


def _parse_chunk(
    lines: list[bytes], first: int, columns: list[str], raw: RawConfig, schema: SchemaConfig, has_time: bool
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, str]]]:
    """Parse one chunk of lines whose first is data line ``first`` (0-based).

    Returns:
        ``(columns, line_index, bad)``: output columns of the good rows, each good row's data line
        index [n_good] int64, and ``(data line index, reason)`` of every bad row in line order
        (reasons are spelled out for the first few only: they are all a report shows).
    """
    needed = [schema.label, *schema.dense, *schema.sparse] + ([schema.event_time] if has_time else [])
    index = np.arange(first, first + len(lines))  # data line index of each line parsed
    set_aside: list[tuple[int, str]] = []
    try:
        strings, wrong_width = _read_strings(lines, columns, needed, raw)
    except _Refused:
        # Bytes Arrow cannot take (not UTF-8, a carriage return inside a line): those lines are bad rows.
        span = f"{first + 1 + int(raw.header)}..{first + len(lines) + int(raw.header)}"
        screened = screen_lines(lines, raw.delimiter, columns, set(needed))
        set_aside = [(first + i, reason) for i, reason in screened]
        keep = np.delete(np.arange(len(lines)), [i for i, _ in screened])
        lines, index = [lines[i] for i in keep.tolist()], index[keep]
        try:
            strings, wrong_width = _read_strings(lines, columns, needed, raw)
        except _Refused as e:
            raise ConversionError(f"{raw.path}: cannot parse lines {span}: {e}") from None
    rows = np.delete(np.arange(len(lines)), [i for i, _ in wrong_width])  # row -> position in lines
    line_index = index[rows]
    bad = set_aside + [(int(index[i]), reason) for i, reason in wrong_width]
    out, problems = _convert_columns(strings, schema, raw, has_time)
    reject = np.zeros(len(line_index), dtype=bool)
    for mask, _, _ in problems:
        reject |= mask
    if not reject.any():
        return out, line_index, sorted(bad)
    rejected = np.flatnonzero(reject)
    reasons = [
        _reason(strings, problems, row, lines[rows[row]]) if k < _MAX_REPORTED else ""
        for k, row in enumerate(rejected)
    ]
    bad = sorted(bad + list(zip(line_index[rejected].tolist(), reasons)))
    return {name: values[~reject] for name, values in out.items()}, line_index[~reject], bad


class _Refused(Exception):
    """Arrow could not parse a chunk into one row per line; the message says why."""


def _read_strings(
    lines: list[bytes], columns: list[str], needed: list[str], raw: RawConfig
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """The ``needed`` columns of ``lines`` as strings (empty -> null), and the ``(position in lines,
    reason)`` of the lines of the wrong width.

    Raises:
        _Refused: bytes that are not UTF-8, an Arrow error, or rows that do not match the lines one to one.
    """
    wrong_width: list[tuple[int, str]] = []
    if not lines:  # every line of the chunk was set aside; Arrow calls an empty input an error
        return pa.table({name: pa.array([], pa.string()) for name in needed}), wrong_width
    buffer = b"".join(lines)
    # An ASCII chunk (Criteo's always are) is UTF-8; that check costs ~1% of parsing it, a full decode 20%.
    if not buffer.isascii():
        try:
            buffer.decode()
        except UnicodeDecodeError as e:
            raise _Refused(f"not UTF-8 text ({e.reason})") from None

    def on_invalid(row: pacsv.InvalidRow) -> str:
        # Single-threaded parsing is what makes row.number (1-based within the chunk) available.
        if row.text.strip():
            reason = f"expected {row.expected_columns} columns, got {row.actual_columns}"
        else:
            reason = "blank line"
        wrong_width.append((row.number - 1, reason))
        return "skip"

    # ~1 MiB blocks parse twice as fast as one big block (cache-sized); a block must hold a whole line.
    block_size = max(1 << 20, 2 * max(map(len, lines), default=0))
    # TSV logs (Criteo) never quote, so a stray '"' there is one bad value, not a field eating lines.
    quote_char = False if raw.delimiter == "\t" else '"'

    try:
        strings = pacsv.read_csv(
            pa.py_buffer(buffer),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=False, block_size=block_size),
            parse_options=pacsv.ParseOptions(
                delimiter=raw.delimiter, quote_char=quote_char, invalid_row_handler=on_invalid,
                ignore_empty_lines=False,
            ),
            # Only "" is missing: Arrow's default null spellings ("NA", "null", ...) would hide bad values.
            convert_options=pacsv.ConvertOptions(
                include_columns=needed, column_types=dict.fromkeys(needed, pa.string()),
                strings_can_be_null=True, null_values=[""],
            ),
        )
    except pa.ArrowInvalid as e:
        raise _Refused(shorten(str(e))) from None
    if strings.num_rows + len(wrong_width) != len(lines):
        # Row i must be line i, or every line number (and the split) would be off.
        raise _Refused(f"they parse into {strings.num_rows + len(wrong_width)} rows, not {len(lines)}: "
                       "a quoted value spanning lines?")
    return strings, wrong_width


def _convert_columns(
    strings: pa.Table, schema: SchemaConfig, raw: RawConfig, has_time: bool
) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, str, str]]]:
    """String columns -> output arrays, plus ``(bad mask, column, problem)`` for each check that can fail."""
    out: dict[str, np.ndarray] = {}
    problems = []
    label, bad = _parse_number(strings[schema.label], _FLOAT, pa.float64())
    out[schema.label] = label.astype(np.float32)
    problems.append((bad | ~np.isin(label, (0.0, 1.0)), schema.label, "label must be 0 or 1"))
    for name in schema.dense:
        value, bad = _parse_number(strings[name], _FLOAT, pa.float64(), missing=0.0)
        out[name] = np.log1p(np.maximum(value, 0.0)).astype(np.float32)
        problems.append((bad | ~np.isfinite(value), name, "not a finite number"))
    for name in schema.sparse:
        if raw.hex_ids:
            out[name], bad = parse_hex(strings[name])
            problems.append((bad, name, "not a hex ID of 1..15 digits"))
        else:
            out[name] = hash_strings(strings[name])
    if has_time:
        out[schema.event_time], bad = _parse_time(strings[schema.event_time], raw.time_format)
        problems.append((bad, schema.event_time, f"not a time ({raw.time_format or 'integer seconds'})"))
    return out, problems


def _parse_number(
    strings: pa.ChunkedArray, pattern: str, type_: pa.DataType, missing: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse numbers; null -> ``missing`` (bad when None); a value Arrow's cast rejects -> bad (value 0).

    Callers also reject what the cast accepts and the regex does not ("inf", "nan", huge integers),
    so a row's fate does not depend on which path its chunk took.
    """
    try:
        values = pc.cast(strings, type_)
        bad = np.zeros(len(strings), dtype=bool)
    except pa.ArrowInvalid:
        # Some value is malformed: find which with a regex that only passes what the cast accepts.
        ok = pc.match_substring_regex(strings, pattern).fill_null(True)
        values = pc.cast(pc.if_else(ok, strings, pa.scalar(None, pa.string())), type_)
        bad = ~ok.to_numpy()
    if missing is None:
        bad |= strings.is_null().to_numpy()
    return pc.fill_null(values, missing or 0).to_numpy(), bad


def _parse_time(strings: pa.ChunkedArray, time_format: str) -> tuple[np.ndarray, np.ndarray]:
    """Event time as int64 seconds: integer seconds, or a strptime ``time_format`` (e.g. ``%y%m%d%H``)."""
    if not time_format:
        seconds, bad = _parse_number(strings, _INT, pa.int64())
        return seconds, bad | (seconds >= 10**18) | (seconds <= -(10**18))
    parsed = pc.strptime(strings, format=time_format, unit="s", error_is_null=True)
    bad = parsed.is_null().to_numpy()
    seconds = pc.fill_null(parsed.cast(pa.int64()), 0).to_numpy()
    return seconds, bad


def _reason(strings: pa.Table, problems: list[tuple[np.ndarray, str, str]], row: int, line: bytes) -> str:
    """Why ``row`` (raw ``line``) is bad: a blank line, or its first failed check with the raw value."""
    if not line.strip():
        return "blank line"
    _, name, problem = next(p for p in problems if p[0][row])
    return f"{name}: {problem} (got {shorten(strings[name][row].as_py() or '')})"


def _record_bad(report: ConversionReport, bad: list[tuple[int, str]], total: int, raw: RawConfig) -> None:
    """Count bad rows; fail as soon as they exceed the tolerance for the whole file (known from line count)."""
    report.bad_rows += len(bad)
    room = _MAX_REPORTED - len(report.first_bad)
    report.first_bad.extend(BadLine(line=i + 1 + int(raw.header), reason=r) for i, r in bad[:room])
    if report.bad_rows > raw.max_bad_fraction * total:
        raise ConversionError(
            f"{raw.path}: {report.bad_rows} malformed rows of {total} exceed data.raw.max_bad_fraction="
            f"{raw.max_bad_fraction}; first bad lines:\n{report.describe_bad()}"
        )


def _output_schema(schema: SchemaConfig, has_time: bool) -> pa.Schema:
    fields = [pa.field(schema.label, pa.float32())]
    fields += [pa.field(name, pa.float32()) for name in schema.dense]
    fields += [pa.field(name, pa.int64()) for name in schema.sparse]
    if has_time:
        fields.append(pa.field(schema.event_time, pa.int64()))
    return pa.schema(fields)


_OLD = ".convert-old"
"""Where the previous splits wait while new ones are renamed in (see :func:`_replace_outputs`)."""


def _replace_outputs(out_root: Path, tmp: Path) -> None:
    """Swap the converted splits in; stats computed from the old splits would now lie, so they go.

    The old splits and stats are first renamed into ``.convert-old`` and removed only once both new
    splits are in place: a crash mid-swap leaves them there, and the next prepare puts them back
    (:func:`_undo_interrupted_swap`) before anything else.
    """
    old = out_root / _OLD
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    for name in ("train", "valid", "stats"):
        if (out_root / name).exists():
            (out_root / name).rename(old / name)
    for split in ("train", "valid"):
        (tmp / split).rename(out_root / split)
    shutil.rmtree(old)


def _undo_interrupted_swap(out_root: Path) -> None:
    """Put back the previous splits that a prepare killed mid-swap left in ``.convert-old`` (what stands
    in their place then is part of the new output: it goes)."""
    old = out_root / _OLD
    if not old.is_dir():
        return
    for kept in old.iterdir():
        shutil.rmtree(out_root / kept.name, ignore_errors=True)
        kept.rename(out_root / kept.name)
    old.rmdir()
