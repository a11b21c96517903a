"""Raw log -> Parquet conversion: values, malformed rows, splits, chunking, CSV headers."""

import calendar
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recmem.config import RawConfig, SchemaConfig
from recmem.data.convert import ConversionError, convert_raw
from recmem.data.ids import MISSING_ID, hash_strings

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "criteo_tiny.tsv"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCHEMA = SchemaConfig(event_time=None, true_prob=None)


def _reference(line: str) -> dict:
    """An independent, per-value parse of one Criteo line: what the converter must produce."""
    fields = line.rstrip("\n").split("\t")
    row = {"label": float(fields[0])}
    for i, value in enumerate(fields[1:14], start=1):
        row[f"I{i}"] = math.log1p(max(float(value), 0.0)) if value else 0.0
    for j, value in enumerate(fields[14:], start=1):
        row[f"C{j}"] = int(value, 16) if value else MISSING_ID
    return row


def _convert(path: Path, out: Path, **raw) -> tuple:
    raw.setdefault("valid_fraction", 0.0)
    report = convert_raw(RawConfig(path=str(path), **raw), SCHEMA, out, progress=False)
    splits = {s: pq.read_table(out / s).to_pylist() for s in ("train", "valid")}
    return report, splits


def _assert_rows_equal(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), key


def test_good_rows_values(tmp_path):
    report, splits = _convert(TINY, tmp_path)
    lines = TINY.read_text().splitlines()
    _assert_rows_equal(splits["train"], [_reference(line) for line in lines])
    assert splits["valid"] == []
    assert report.rows_read == 12 and report.rows_written == {"train": 12, "valid": 0} and report.bad_rows == 0
    first = splits["train"][0]
    assert first["I1"] == 0.0  # "-3": negatives clip to 0 before log1p
    assert first["I2"] == 0.0  # missing
    assert first["I3"] == pytest.approx(math.log(10.0))  # "9"
    assert first["C1"] == 10 and first["C9"] == 0xFFFFFFFF  # "0000000a", "ffffffff"
    assert first["C11"] == MISSING_ID
    schema = pq.read_schema(tmp_path / "train" / "part-00000.parquet")
    assert schema.field("label").type == pa.float32() and schema.field("I1").type == pa.float32()
    assert schema.field("C1").type == pa.int64() and "event_time" not in schema.names


def test_split_by_position(tmp_path):
    lines = TINY.read_text().splitlines()
    _, splits = _convert(TINY, tmp_path / "a", valid_rows=3)
    _assert_rows_equal(splits["train"], [_reference(line) for line in lines[:9]])
    _assert_rows_equal(splits["valid"], [_reference(line) for line in lines[9:]])
    report, _ = _convert(TINY, tmp_path / "b", valid_fraction=0.25)
    assert report.rows_written == {"train": 9, "valid": 3}


def _with_bad_lines(tmp_path: Path) -> tuple[Path, list[str]]:
    """The tiny fixture with five malformed lines mixed in; returns the file and its good lines."""
    good = TINY.read_text().splitlines()
    short = "\t".join(good[0].split("\t")[:-1])
    bad_number = good[1].split("\t")
    bad_number[3] = "12abc"
    bad_hex = good[2].split("\t")
    bad_hex[20] = "zz12"
    lines = good[:2] + [short] + good[2:5] + ["\t".join(bad_number), "2" + good[5][1:], ""] + good[5:8]
    lines += ["\t".join(bad_hex)] + good[8:]
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path, good


def test_malformed_rows_counted_reported_and_skipped(tmp_path):
    path, good = _with_bad_lines(tmp_path)
    report, splits = _convert(path, tmp_path / "out", max_bad_fraction=0.5)
    assert report.rows_read == 17 and report.bad_rows == 5
    assert [b.line for b in report.first_bad] == [3, 7, 8, 9, 13]
    reasons = [b.reason for b in report.first_bad]
    assert "expected 40 columns, got 39" in reasons[0]
    assert "I3" in reasons[1] and "'12abc'" in reasons[1]
    assert "label" in reasons[2] and reasons[3] == "blank line"  # "2", and the empty line
    assert "C7" in reasons[4] and "'zz12'" in reasons[4]
    assert "bad 5" in str(report) and "line 13: C7" in str(report)
    _assert_rows_equal(splits["train"], [_reference(line) for line in good])


def test_too_many_bad_rows_fail_naming_file_and_lines(tmp_path):
    path, _ = _with_bad_lines(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        _convert(path, out, max_bad_fraction=0.1, chunk_rows=4)
    message = str(e.value)
    assert str(path) in message and "of 17" in message and "line 3:" in message
    assert not (out / "train").exists()  # a failed conversion publishes nothing


def test_non_finite_and_null_spellings_are_bad_in_any_chunking(tmp_path):
    good = TINY.read_text().splitlines()

    def with_value(line: str, index: int, value: str) -> str:
        fields = line.split("\t")
        fields[index] = value
        return "\t".join(fields)

    lines = [with_value(good[0], 5, "inf"), with_value(good[1], 6, "NA"), good[2], with_value(good[3], 5, "1x")]
    path = tmp_path / "odd.tsv"
    path.write_text("\n".join(lines + [with_value(good[4], 0, "nan")]) + "\n")
    # chunk_rows=1 parses "inf" alone (the cast succeeds); one chunk parses it next to "1x" (the cast fails).
    for chunk_rows in (1, 100):
        report, splits = _convert(path, tmp_path / str(chunk_rows), max_bad_fraction=1.0, chunk_rows=chunk_rows)
        assert [b.line for b in report.first_bad] == [1, 2, 4, 5]
        _assert_rows_equal(splits["train"], [_reference(good[2])])


def test_line_endings_and_stray_characters(tmp_path):
    good = TINY.read_text().splitlines()
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(("\r\n".join(good) + "\r\n").encode())
    _, splits = _convert(crlf, tmp_path / "crlf")
    _assert_rows_equal(splits["train"], [_reference(line) for line in good])
    quoted = tmp_path / "quote.tsv"
    quoted.write_text("\n".join(good[:3] + ['"' + good[3]] + good[4:]) + "\n")  # TSV: quotes are plain text
    report, _ = _convert(quoted, tmp_path / "quote", max_bad_fraction=0.5)
    assert [b.line for b in report.first_bad] == [4] and report.rows_written["train"] == 11
    stray_cr = tmp_path / "cr.tsv"
    stray_cr.write_text("\n".join(good[:3] + [good[3][:9] + "\r" + good[3][9:]] + good[4:]) + "\n")
    report, splits = _convert(stray_cr, tmp_path / "cr", max_bad_fraction=0.5)  # Arrow would split the line
    assert [(b.line, b.reason) for b in report.first_bad] == [(4, "I3: carriage return inside the line")]
    _assert_rows_equal(splits["train"], [_reference(line) for line in good[:3] + good[4:]])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_rows=st.integers(1, 20), part_rows=st.integers(1, 20), valid_rows=st.integers(0, 17))
def test_chunking_does_not_change_output(tmp_path, chunk_rows, part_rows, valid_rows):
    path, _ = _with_bad_lines(tmp_path)
    whole, whole_rows = _convert(path, tmp_path / "whole", max_bad_fraction=0.5, valid_rows=valid_rows)
    chunked, chunked_rows = _convert(
        path, tmp_path / "chunked", max_bad_fraction=0.5, valid_rows=valid_rows,
        chunk_rows=chunk_rows, part_rows=part_rows,
    )
    assert chunked_rows == whole_rows
    assert chunked.first_bad == whole.first_bad and chunked.rows_written == whole.rows_written
    parts = sorted((tmp_path / "chunked" / "train").glob("part-*.parquet"))
    assert len(parts) == max(1, -(-chunked.rows_written["train"] // part_rows))


def test_hashed_strings_header_and_time_format(tmp_path):
    schema = SchemaConfig(
        label="click", dense=[], sparse=["C1", "site_id", "device_type"], event_time="hour", true_prob=None
    )
    raw = RawConfig(
        path=str(FIXTURES / "avazu_tiny.csv"), delimiter=",", header=True, hex_ids=False,
        time_format="%y%m%d%H", valid_rows=2,
    )
    report = convert_raw(raw, schema, tmp_path, progress=False)
    assert report.rows_written == {"train": 4, "valid": 2}
    train = pq.read_table(tmp_path / "train")
    assert train.column_names == ["click", "C1", "site_id", "device_type", "hour"]
    assert train["hour"].to_pylist()[-1] == calendar.timegm((2014, 10, 21, 2, 0, 0))
    assert train["site_id"].to_pylist() == hash_strings(pa.array(["1fbe01fe"] * 2 + ["85f751fd", ""])).tolist()
    assert train["site_id"][3].as_py() == MISSING_ID
    raw.time_format = ""  # integer seconds
    convert_raw(raw, schema, tmp_path, progress=False)
    assert pq.read_table(tmp_path / "valid")["hour"].to_pylist() == [14102102, 14102103]


def test_missing_schema_column_is_named(tmp_path):
    schema = SchemaConfig(sparse=["C1", "C99"], event_time=None, true_prob=None)
    raw = RawConfig(path=str(FIXTURES / "avazu_tiny.csv"), delimiter=",", header=True)
    with pytest.raises(ConversionError, match="C99"):
        convert_raw(raw, schema, tmp_path, progress=False)
    with pytest.raises(ConversionError, match="not found"):
        convert_raw(RawConfig(path=str(tmp_path / "nope.tsv")), SCHEMA, tmp_path, progress=False)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_csv_with_header_shared_sample(tmp_path):
    path = SHARED / "deepctr_samples" / "criteo_sample.txt"
    raw = RawConfig(path=str(path), delimiter=",", header=True, valid_rows=50)
    report = convert_raw(raw, SCHEMA, tmp_path, progress=False)
    assert report.rows_written == {"train": 150, "valid": 50} and report.bad_rows == 0
    first = pq.read_table(tmp_path / "train").slice(0, 1).to_pylist()[0]
    assert first["I3"] == pytest.approx(math.log1p(260.0))  # written as "260.0"
    assert first["I1"] == 0.0 and first["C1"] == 0x05DB9164 and first["C19"] == MISSING_ID


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_criteo_kaggle_10k_shared(tmp_path):
    path = SHARED / "criteo_kaggle_head10k" / "train_10k.txt"
    report = convert_raw(RawConfig(path=str(path), valid_rows=2000), SCHEMA, tmp_path, progress=False)
    assert report.rows_written == {"train": 8000, "valid": 2000} and report.bad_rows == 0
    labels = np.concatenate([pq.read_table(tmp_path / s)["label"].to_numpy() for s in ("train", "valid")])
    assert labels.mean() == pytest.approx(0.218, abs=0.001)
