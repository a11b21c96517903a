"""Where the online loop's rows come from: a stream cut into windows, read from committed offsets.

A stream is a set of *keys*, each an append-only sequence of rows: a landed file (the embedded
default, :class:`LandingDirectory`) or a Kafka partition. The loop's progress is one offset per key
(``{key: rows consumed}``), committed in the same atomic checkpoint as the model; a source is asked
for the next window *after those offsets*, so what a crash loses is only uncommitted work, which the
next run reads again. That is the whole exactly-once argument, and it holds for any source that
can read from a given offset:

- files: the key is the file's name, the offset the rows of it trained; a file is done when its
  offset reaches its row count;
- Kafka: the key is ``topic/partition``, the offset Kafka's (the next message to read). An adapter
  seeks each partition to the committed offset (``consumer.seek``), polls up to ``window_rows``
  messages, decodes them into an Arrow table of the schema's columns and returns them as a
  :class:`Window`. It never commits offsets to Kafka itself: the checkpoint is the commit (Kafka's
  own commits could run ahead of the model or behind it). recmem ships no Kafka adapter (it would
  need a client library and a broker to test against); :class:`StreamSource` is what one implements.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from recmem.config import SchemaConfig
from recmem.data.batch import Batch
from recmem.data.collate import collate
from recmem.data.dataset import bad_values

QUARANTINE = "quarantine"
"""The landing directory's sub-folder for files that cannot be trained (with a ``.reason.txt`` each)."""


@dataclass(frozen=True)
class Window:
    """Rows ``[begin, begin + rows)`` of the stream key ``key``, to score, then train on.

    Attributes:
        key: the file name (or ``topic/partition``).
        begin: the offset of the first row.
        table: the rows, holding the schema's columns.
        last: True when the window ends its file (a partition never ends).
        landed: when its rows arrived (Unix time: the file's modification time), if known.
    """

    key: str
    begin: int
    table: pa.Table
    last: bool
    landed: float | None = None

    @property
    def end(self) -> int:
        """The offset after the window: what the loop commits for ``key`` once it is trained."""
        return self.begin + self.table.num_rows

    def batches(self, schema: SchemaConfig, batch_size: int) -> Iterator[Batch]:
        """The window as Batches of ``batch_size`` rows, the last one shorter (no row is dropped)."""
        for start in range(0, self.table.num_rows, batch_size):
            yield collate(self.table.slice(start, batch_size), schema)


class StreamSource(Protocol):
    """A stream the online loop reads (see the module docstring for files and Kafka)."""

    def next_window(self, offsets: dict[str, int]) -> Window | None:
        """The next rows after the committed ``offsets`` ({key: rows consumed}), or None when no
        new rows have arrived yet."""
        ...


@dataclass(frozen=True)
class _Landed:
    """A landed file's footer facts."""

    rows: int
    first_time: int | None
    landed: float | None


class LandingDirectory:
    """Parquet files that producers land in a folder (local, or a pyarrow filesystem URI).

    Producers write each file under a name starting with ``.`` or ``_`` (or not ending ``.parquet``)
    and rename it when complete; such names are ignored until then. Files are taken in order of
    their earliest event time (from the Parquet statistics), then name; once taken, a file is read
    whole and checked (the schema's columns, labels in [0, 1], finite dense values) before any of its
    rows trains. A file that fails (a truncated or half-written file, a missing column, a bad value)
    is moved to ``quarantine/`` beside a ``<name>.reason.txt`` saying why, reported through
    ``report``, and skipped: never half-trained.

    Args:
        landing: the folder (or URI).
        schema: the column roles.
        window_rows: rows per window; 0: one window per file.
        report: called with one line per quarantined file.
    """

    def __init__(self, landing: str, schema: SchemaConfig, window_rows: int = 0,
                 report: Callable[[str], None] = print) -> None:
        if "://" in landing:
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(landing.rstrip("/"))
        else:
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), landing
        self.fs.create_dir(posixpath.join(self.root, QUARANTINE), recursive=True)
        self.schema, self.window_rows, self.report = schema, window_rows, report
        self.required = [schema.label, *schema.dense, *schema.sparse]
        self.columns = [*self.required, *(c for c in (schema.event_time, schema.true_prob) if c)]
        self.quarantined: list[str] = []
        self._footers: dict[str, _Landed] = {}
        self._read: tuple[str, pa.Table] | None = None

    def next_window(self, offsets: dict[str, int]) -> Window | None:
        """The next window after ``offsets`` (see :class:`StreamSource`); quarantines bad files on the way."""
        while True:
            pending = [(info.first_time is None, info.first_time or 0, name) for name, info in self._listing().items()
                       if offsets.get(name, 0) < info.rows]
            if not pending:
                return None
            name = min(pending)[2]
            table = self._whole(name)
            if table is None:
                continue
            begin = offsets.get(name, 0)
            rows = self.window_rows or table.num_rows
            piece = table.slice(begin, rows)
            return Window(name, begin, piece, begin + piece.num_rows >= table.num_rows, self._footers[name].landed)

    def _listing(self) -> dict[str, _Landed]:
        """Footer facts of every landed file (read once per file: a landed file never changes)."""
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root))
        names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File
                       and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_")))
        for name in names:
            if name not in self._footers:
                try:
                    self._footers[name] = self._footer(name)
                except (OSError, pa.ArrowException, ValueError) as e:
                    self._quarantine(name, f"its Parquet footer does not read ({_first_line(e)})")
        return {n: self._footers[n] for n in names if n in self._footers}

    def _footer(self, name: str) -> _Landed:
        path = posixpath.join(self.root, name)
        with self.fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        mtime = self.fs.get_file_info(path).mtime
        column = self.schema.event_time
        first = None
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if column and column in names:
            j = names.index(column)
            mins = [meta.row_group(g).column(j).statistics for g in range(meta.num_row_groups)]
            found = [int(s.min) for s in mins if s is not None and s.has_min_max]
            first = min(found) if found else None
        return _Landed(meta.num_rows, first, mtime.timestamp() if mtime is not None else None)

    def _whole(self, name: str) -> pa.Table | None:
        """The checked rows of ``name`` (kept for its next windows), or None after quarantining it."""
        if self._read is not None and self._read[0] == name:
            return self._read[1]
        try:
            with self.fs.open_input_file(posixpath.join(self.root, name)) as f:
                parquet = pq.ParquetFile(f)
                present = set(parquet.schema_arrow.names)
                missing = [c for c in self.required if c not in present]
                if missing:
                    raise ValueError(f"it lacks the column {missing[0]!r}")
                table = parquet.read(columns=[c for c in self.columns if c in present])
        except (OSError, pa.ArrowException, ValueError) as e:
            self._quarantine(name, f"does not read as the schema's columns ({_first_line(e)})")
            return None
        bad = bad_values(table, self.schema)
        if bad is None:
            try:
                collate(table.slice(0, 1), self.schema)
            except (KeyError, ValueError, TypeError, pa.ArrowException) as e:
                bad = 0, f"its columns do not collate ({_first_line(e)})"
        if bad is not None:
            self._quarantine(name, f"row {bad[0]}: {bad[1]}")
            return None
        self._read = (name, table)
        return table

    def _quarantine(self, name: str, why: str) -> None:
        """Move ``name`` into ``quarantine/`` with its reason, and report it."""
        folder = posixpath.join(self.root, QUARANTINE)
        self.fs.move(posixpath.join(self.root, name), posixpath.join(folder, name))
        with self.fs.open_output_stream(posixpath.join(folder, f"{name}.reason.txt")) as out:
            out.write(f"{why}\n".encode())
        self._footers.pop(name, None)
        self.quarantined.append(name)
        self.report(f"recmem online: quarantined {name}: {why}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
