"""`recmem prepare` on dirty, compressed, empty and contended input (issue 9, items 5 and 6).

Each test builds a 1,000-line Criteo TSV from the tiny fixture, damages it one way, and checks that
the damage costs exactly the damaged rows (with absolute line numbers and column names), or fails
with one clear line that leaves the previous prepared data byte-identical.
"""

from __future__ import annotations

import bz2
import gzip
import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recmem.cli import main
from recmem.config import RawConfig, SchemaConfig
from recmem.data.convert import BadLine, ConversionError, convert_raw
from recmem.lock import LOCK_NAME
from tests.holders import held_by_another_process

TINY = Path(__file__).parent / "fixtures" / "criteo_tiny.tsv"
SCHEMA = SchemaConfig(event_time=None, true_prob=None)
ROWS = 1000


def _lines() -> list[bytes]:
    """1,000 good Criteo lines (the fixture's 12, repeated)."""
    good = TINY.read_bytes().splitlines(keepends=True)
    return [good[i % len(good)] for i in range(ROWS)]


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def _convert(path: Path, out: Path, **raw):
    raw = {"valid_rows": 100, "chunk_rows": 64, **raw}  # line 500 sits mid-chunk: numbers must be absolute
    report = convert_raw(RawConfig(path=str(path), **raw), SCHEMA, out, progress=False)
    return report, {s: pq.read_table(out / s) for s in ("train", "valid")}


def _with_field(line: bytes, column: int, value: bytes) -> bytes:
    fields = line.rstrip(b"\n").split(b"\t")
    fields[column] = value
    return b"\t".join(fields) + b"\n"


def _expected(tmp_path: Path, lines: list[bytes], drop: int):
    """The splits of the file without line ``drop`` (1-based): what a damaged file must still give."""
    clean = _write(tmp_path / "clean.tsv", lines[: drop - 1] + lines[drop:])
    return _convert(clean, tmp_path / "clean", valid_rows=100)[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the lock file (a record of the last holder, rewritten by each run)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _prepare(root: Path, raw: Path, capsys) -> tuple[int, str]:
    """``recmem prepare`` through the CLI; returns its exit code and stderr."""
    rc = main(["prepare", f"data.root={root}", f"data.raw.path={raw}", "data.raw.valid_rows=100",
               "data.schema.event_time=null", "data.schema.true_prob=null"])
    return rc, capsys.readouterr().err


def test_one_bad_byte_is_one_bad_row_with_line_and_column(tmp_path):
    lines = _lines()
    lines[499] = _with_field(lines[499], 16, b"05d\xff9164")  # C3 of line 500
    report, splits = _convert(_write(tmp_path / "raw.tsv", lines), tmp_path / "out")
    assert report.bad_rows == 1
    assert report.first_bad == [BadLine(line=500, reason="C3: not UTF-8 text (byte 0xff)")]
    assert report.rows_written == {"train": 899, "valid": 100}
    expected = _expected(tmp_path, lines, drop=500)
    assert all(splits[s].equals(expected[s]) for s in splits)


def test_bad_byte_in_a_csv_with_header_counts_the_header_line(tmp_path):
    lines = [line.replace(b"\t", b",") for line in _lines()]
    header = b",".join([b"label"] + [f"I{i}".encode() for i in range(1, 14)] + [f"C{i}".encode() for i in range(1, 27)])
    lines[9] = _with_field(lines[9].replace(b",", b"\t"), 2, b"\xc3(").replace(b"\t", b",")  # I2 of data line 10
    report, _ = _convert(_write(tmp_path / "raw.csv", [header + b"\n"] + lines), tmp_path / "out",
                         delimiter=",", header=True)
    assert report.first_bad == [BadLine(line=11, reason="I2: not UTF-8 text (byte 0xc3)")]
    assert report.rows_written["train"] + report.rows_written["valid"] == ROWS - 1


def test_a_binary_line_is_one_bad_row(tmp_path):
    lines = _lines()
    rng = random.Random(9)
    lines[499] = bytes(rng.choice([b for b in range(256) if b != 0x0A]) for _ in range(300)) + b"\n"
    report, splits = _convert(_write(tmp_path / "raw.tsv", lines), tmp_path / "out")
    assert report.bad_rows == 1 and report.first_bad[0].line == 500
    expected = _expected(tmp_path, lines, drop=500)
    assert all(splits[s].equals(expected[s]) for s in splits)


@pytest.mark.parametrize("codec", ["gzip", "bz2", "zstd", "lz4"])
def test_compressed_raw_converts_like_the_plain_file(tmp_path, codec):
    plain = _write(tmp_path / "raw.tsv", _lines())
    packed = tmp_path / f"raw.tsv.{codec}"
    with pa.CompressedOutputStream(str(packed), codec) as f:
        f.write(plain.read_bytes())
    _, want = _convert(plain, tmp_path / "plain")
    report, got = _convert(packed, tmp_path / "packed")
    assert report.rows_read == ROWS and report.bad_rows == 0
    assert all(got[s].equals(want[s]) for s in want)
    # The bytes decide, not the name: a gzip stream named .tsv, two gzip members back to back.
    disguised = tmp_path / "disguised.tsv"
    disguised.write_bytes(gzip.compress(plain.read_bytes()[:5000]) + gzip.compress(plain.read_bytes()[5000:]))
    assert all(_convert(disguised, tmp_path / "disguised")[1][s].equals(want[s]) for s in want)


def test_corrupt_or_unreadable_compressed_input_fails_in_one_line(tmp_path, capsys):
    data = b"".join(_lines())
    truncated = tmp_path / "truncated.tsv.gz"
    truncated.write_bytes(gzip.compress(data)[:2000])
    broken_bz2 = tmp_path / "broken.tsv.bz2"
    broken_bz2.write_bytes(bz2.compress(data)[:10] + b"\0" * 500)
    archive = tmp_path / "raw.zip"
    archive.write_bytes(b"PK\x03\x04" + os.urandom(100))
    for path, text in ((truncated, "cannot decompress (gzip)"), (broken_bz2, "cannot decompress (bz2)"),
                       (archive, "is a zip archive")):
        with pytest.raises(ConversionError, match=text.replace("(", r"\(").replace(")", r"\)")):
            _convert(path, tmp_path / "out")
        rc, err = _prepare(tmp_path / "root", path, capsys)
        assert rc == 2 and err.count("\n") == 1 and text in err and "Traceback" not in err


def test_empty_input_is_an_error_that_leaves_the_previous_output_byte_identical(tmp_path, capsys):
    root = tmp_path / "root"
    assert _prepare(root, _write(tmp_path / "raw.tsv", _lines()), capsys)[0] == 0
    before = _snapshot(root)
    assert {"train/part-00000.parquet", "valid/part-00000.parquet"} <= before.keys()
    assert any(name.startswith("stats/") for name in before)
    empty = _write(tmp_path / "empty.tsv", [])
    rc, err = _prepare(root, empty, capsys)
    assert rc == 2
    assert err == f"recmem prepare: error: {empty}: no data lines (the file is empty); {root} is left as it was\n"
    # Every row bad (with a tolerance that allows it) converts nothing: also an error, also no change.
    all_bad = _write(tmp_path / "bad.tsv", [b"\xff\n"] * 10)
    with pytest.raises(ConversionError, match="none of its 10 rows converted"):
        _convert(all_bad, root, max_bad_fraction=1.0)
    assert _snapshot(root) == before  # .convert-tmp is gone too


def test_blank_lines_are_reported_as_blank(tmp_path):
    lines = _lines()
    lines[99], lines[199], lines[299] = b"\n", b"\r\n", b"   \n"
    report, _ = _convert(_write(tmp_path / "raw.tsv", lines), tmp_path / "out", max_bad_fraction=0.5)
    assert report.first_bad == [BadLine(100, "blank line"), BadLine(200, "blank line"), BadLine(300, "blank line")]


def test_a_huge_bad_value_is_cut_in_the_report(tmp_path):
    lines = _lines()
    lines[499] = _with_field(lines[499], 3, b"9" * 10 + b"x" * 1_000_000)  # I3: one 1 MB bad number
    report, _ = _convert(_write(tmp_path / "raw.tsv", lines), tmp_path / "out")
    (bad,) = report.first_bad
    assert bad.line == 500 and bad.reason.startswith("I3: not a finite number (got '9999999999xxx")
    assert "(1,000,010 characters)" in bad.reason and len(bad.reason) < 150 and len(str(report)) < 400


def test_a_second_prepare_on_a_held_root_is_refused_at_once(tmp_path, capsys):
    root = tmp_path / "root"
    assert _prepare(root, _write(tmp_path / "raw.tsv", _lines()), capsys)[0] == 0
    before = _snapshot(root)
    with held_by_another_process(root, "prepare") as pid:
        started = time.monotonic()
        rc, err = _prepare(root, tmp_path / "raw.tsv", capsys)
        assert time.monotonic() - started < 5
        assert rc == 2 and err.count("\n") == 1 and f"prepare (pid {pid} on host" in err
        assert main(["generate", f"data.root={root}"]) == 2
        assert f"pid {pid}" in capsys.readouterr().err
    assert _snapshot(root) == before


def test_a_prepare_killed_mid_swap_gets_its_previous_splits_back(tmp_path, capsys):
    """Killed between moving the old splits aside and moving both new ones in: the next prepare puts
    the old ones back before anything else, even when it then fails itself."""
    root = tmp_path / "root"
    assert _prepare(root, _write(tmp_path / "raw.tsv", _lines()), capsys)[0] == 0
    before = _snapshot(root)
    old = root / ".convert-old"
    old.mkdir()
    for name in ("train", "valid", "stats"):
        (root / name).rename(old / name)
    (root / "train").mkdir()  # the new train split got in; the new valid split did not
    (root / "train" / "part-00000.parquet").write_bytes(b"new, half swapped")
    assert _prepare(root, _write(tmp_path / "empty.tsv", []), capsys)[0] == 2
    assert _snapshot(root) == before and not old.exists()
