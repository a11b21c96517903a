"""The producer side of a landing folder: files written over time, each appearing whole or not at all.

:class:`~recmem.online.source.LandingDirectory` ignores names starting with ``.``, so a file is
written as ``.<name>.tmp`` and renamed to ``<name>`` once complete: a reader lists either nothing or
the whole file (a rename is atomic on a local disk; on an object store pyarrow's move is a copy of
the finished object, which readers also see whole or not at all). ``recmem generate --landing`` and
the online benchmark (``recmem/bench/online.py``) land their streams through :func:`land_stream`.
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

Landed = Callable[[int, str, pa.Table, float], None]
"""Called after each rename with (file index, name, its rows, Unix time of the rename)."""


def landing_fs(landing: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, folder) of a landing folder given as a local path or a pyarrow filesystem URI."""
    if "://" in landing:
        return pyarrow.fs.FileSystem.from_uri(landing.rstrip("/"))
    return pyarrow.fs.LocalFileSystem(), str(landing)


def land_file(landing: str, name: str, table: pa.Table) -> float:
    """Write ``table`` as ``landing/name`` the way producers must (write, then rename).

    Returns:
        The Unix time of the rename: when the file became visible.

    Raises:
        FileExistsError: ``landing`` already holds ``name`` (a landed file is never rewritten: the
            online loop's offsets count its rows).
    """
    fs, root = landing_fs(landing)
    final = posixpath.join(root, name)
    if fs.get_file_info(final).type != pyarrow.fs.FileType.NotFound:
        raise FileExistsError(f"{landing}: {name} has landed already (land a stream into a fresh folder)")
    tmp = posixpath.join(root, f".{name}.tmp")
    try:
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)
    except BaseException:  # Ctrl-C or a full disk mid-write: leave no temporary file behind
        if fs.get_file_info(tmp).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(tmp)
        raise
    return time.time()


def land_stream(tables: Iterable[pa.Table], landing: str, every_s: float, *, stop: threading.Event | None = None,
                landed: Landed | None = None, event_time: str | None = None,
                say: Callable[[str], None] = print) -> int:
    """Land each of ``tables`` as ``part-<k>.parquet`` in ``landing``, one every ``every_s`` seconds.

    The first file lands at once, file k about ``k * every_s`` seconds later (the time a table takes
    to make counts in the wait). ``stop`` is checked before each file and interrupts the wait: a
    stopped stream ends between two files, never inside one.

    Args:
        tables: the files' rows, in landing order (consumed lazily: a generator is made as it lands).
        landing: the folder (created if missing), or a pyarrow filesystem URI.
        every_s: seconds between two files (0: as fast as they are made).
        stop: set to end the stream early (a signal handler sets it for ``recmem generate``).
        landed: called after each file's rename (see :data:`Landed`).
        event_time: the tables' event-time column, for the progress line's data times.
        say: where the progress line (one per file) goes.

    Returns:
        How many files landed.
    """
    fs, root = landing_fs(landing)
    fs.create_dir(root, recursive=True)
    stop = stop or threading.Event()
    count, last = 0, None
    for table in tables:
        if last is not None:
            stop.wait(max(0.0, last + every_s - time.time()))
        if stop.is_set():
            break
        name = f"part-{count:05d}.parquet"
        last = land_file(landing, name, table)
        if landed is not None:
            landed(count, name, table, last)
        count += 1
        say(f"landed {name}: {table.num_rows:,} rows{_span(table, event_time)}")
    return count


def _span(table: pa.Table, column: str | None) -> str:
    """``, data time <first> .. <last>`` of ``table``'s event times (UTC), or nothing."""
    if not column or column not in table.column_names or table.num_rows == 0:
        return ""
    span = pc.min_max(table.column(column))
    first, last = (datetime.fromtimestamp(int(span[end].as_py()), timezone.utc).strftime("%Y-%m-%d %H:%M")
                   for end in ("min", "max"))
    return f", data time {first} .. {last}"
