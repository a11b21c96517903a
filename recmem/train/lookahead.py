"""Exact lookahead prefetch: the loop reads ``depth`` batches ahead and tells the tables.

Offline training knows its next batches, so a table that keeps its rows elsewhere (on disk) can be
told exactly which rows are coming (Bagpipe's lookahead) instead of guessing. :func:`lookahead`
wraps the loop's batch iterator::

    source -> [b0 b1 b2 ...]
    window while the loop trains b0 (depth 2):  b0 (pinned, in use)  b1, b2 (prefetched, pinned)

Every batch is handed to the tables' ``prefetch`` when it is read from the source, ``depth`` steps
before the loop trains it, and its pins are released when the loop asks for the batch after it, so
a row is never evicted while a batch in the window (or the step in flight) still needs it. With no
``Prefetchable`` table the batches pass through untouched.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from recmem.data.batch import Batch
from recmem.tables import TableCollection


def lookahead(batches: Iterable[Batch], tables: TableCollection, depth: int) -> Iterator[Batch]:
    """Yield ``batches`` in order, prefetching each ``depth`` batches before it is yielded.

    Args:
        batches: the training batches (a source's iterator).
        tables: the model's tables; only those meeting ``Prefetchable`` are called.
        depth: how many batches beyond the one being trained are prefetched (0: each batch is
            prefetched just before it is yielded, so its reads are not overlapped with a step).

    Every batch read is released, also when the loop stops early (the generator is closed).
    """
    if not tables.prefetching():
        yield from batches
        return
    window: deque[tuple[Batch, object]] = deque()
    source = iter(batches)
    try:
        while True:
            while len(window) <= depth:
                batch = next(source, None)
                if batch is None:
                    break
                window.append((batch, tables.prefetch(batch.sparse_features)))
            if not window:
                return
            batch, ticket = window[0]
            yield batch
            window.popleft()
            tables.release(ticket)  # the step that used it is over: the loop asked for the next batch
    finally:
        for _, ticket in window:
            tables.release(ticket)
