"""``recmem generate --landing``: the synthetic training rows landed as a stream of files over time
(recmem/online/producer.py), in data-time order, atomically, with IDs born and dying, stopped cleanly."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recmem.cli import main
from recmem.config import SchemaConfig, SyntheticConfig
from recmem.data.synthetic import generate, stream_tables
from recmem.online.source import LandingDirectory

SCHEMA = SchemaConfig()
# Six days in six files of 2,000 rows; chunks of 2,500 rows, so files straddle the generator's chunks.
STREAM = SyntheticConfig(train_rows=12_000, valid_rows=0, chunk_rows=2500, num_days=6)
SIZES = [f"data.synthetic.{k}={v}" for k, v in
         (("train_rows", 12_000), ("valid_rows", 0), ("chunk_rows", 2500), ("num_days", 6))]


def landed(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def test_generate_lands_the_training_split_in_time_order_one_file_at_a_time(tmp_path: Path, capsys) -> None:
    landing = tmp_path / "landing"
    assert main(["generate", *SIZES, "--landing", str(landing), "--every", "0.2", "--file-rows", "2000"]) == 0
    out = capsys.readouterr().out
    files = landed(landing)
    assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(6)]
    assert out.count("recmem generate: landed part-") == 6 and "done: 6 files" in out
    assert [p.name for p in landing.iterdir() if p.name.startswith(".") and p.name != ".recmem.lock"] == []
    # Paced: each file renamed about --every seconds after the one before.
    landed_at = np.array([f.stat().st_mtime for f in files])
    assert np.diff(landed_at).min() > 0.15
    tables = [pq.read_table(f) for f in files]
    times = [t.column(SCHEMA.event_time).to_numpy() for t in tables]
    assert all((np.diff(t) >= 0).all() for t in times)
    assert all(a.max() <= b.min() for a, b in zip(times, times[1:]))  # each file starts where the last ended
    # Row for row the training split `recmem generate` writes to data.root (same config, same rows).
    generate(STREAM, SCHEMA, tmp_path / "root", progress=False)
    split = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "root" / "train").glob("part-*.parquet")))
    assert pa.concat_tables(tables).equals(split)
    # The online loop's source takes them in the order they landed.
    source, offsets, keys = LandingDirectory(str(landing), SCHEMA, report=pytest.fail), {}, []
    while (window := source.next_window(offsets)) is not None:
        offsets[window.key] = window.end
        keys.append(window.key)
    assert keys == [f.name for f in files]


def test_ids_are_born_and_die_along_the_stream() -> None:
    """Against the same stream without turnover (IDs living 10,000 days), many more rows of the last
    two files hold an ID the first two never had (born), and many more rows of the first two an ID
    the last two never have (died). Rare IDs missing by chance count in both, hence a ratio."""
    def born_and_died(cfg: SyntheticConfig) -> tuple[int, int]:
        files = list(stream_tables(cfg, SCHEMA, 2000))
        born = died = 0
        for column in SCHEMA.sparse:
            ids = [t.column(column).to_numpy() for t in files]
            early, late = np.concatenate(ids[:2]), np.concatenate(ids[-2:])
            born += int((~np.isin(late, early)).sum())
            died += int((~np.isin(early, late)).sum())
        return born, died

    drifting = born_and_died(STREAM)
    still = born_and_died(dataclasses.replace(STREAM, min_lifetime_days=10_000.0, head_lifetime_days=10_000.0))
    assert drifting[0] > 1.4 * still[0] and drifting[1] > 1.4 * still[1], (drifting, still)


def test_ctrl_c_ends_the_stream_between_files_and_exits_0(tmp_path: Path, capsys) -> None:
    landing = tmp_path / "landing"
    def interrupt() -> None:  # SIGINT once the first file has landed, while the producer waits out --every
        while not (landing / "part-00000.parquet").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # not always Python's default: a shell's `cmd &` ignores SIGINT
    threading.Thread(target=interrupt, daemon=True).start()
    assert main(["generate", *SIZES, "--landing", str(landing), "--every", "30", "--file-rows", "2000"]) == 0
    assert [f.name for f in landed(landing)] == ["part-00000.parquet"]
    assert not list(landing.glob(".*.tmp"))
    assert "stopped: 1 files" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_a_landed_file_is_never_rewritten(tmp_path: Path, capsys) -> None:
    landing = tmp_path / "landing"
    assert main(["generate", *SIZES, "--landing", str(landing), "--every", "0", "--files", "1"]) == 0
    before = (landing / "part-00000.parquet").read_bytes()
    assert main(["generate", *SIZES, "--landing", str(landing), "--every", "0", "--files", "1"]) == 2
    assert "part-00000.parquet has landed already" in capsys.readouterr().err
    assert (landing / "part-00000.parquet").read_bytes() == before
