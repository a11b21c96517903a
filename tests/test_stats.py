"""Feature statistics: exact counts, summary, loaders, missing-stats errors."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recmem.config import RawConfig, SchemaConfig
from recmem.data.convert import convert_raw
from recmem.data.ids import MISSING_ID
from recmem.data.layout import PartWriter
from recmem.data.stats import IdCounter, load_counts, load_ids, load_summary, write_stats

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCHEMA = SchemaConfig(dense=[], sparse=["C1", "C2"], event_time=None, true_prob=None)


def _root(tmp_path: Path, c1: np.ndarray, c2: list, labels: np.ndarray) -> Path:
    schema = pa.schema([("label", pa.float32()), ("C1", pa.int64()), ("C2", pa.list_(pa.int64()))])
    writer = PartWriter(tmp_path / "train", schema, part_rows=7)
    for s in range(0, len(c1), 3):
        writer.write(pa.table({"label": labels[s : s + 3], "C1": c1[s : s + 3], "C2": c2[s : s + 3]}, schema=schema))
    writer.close()
    return tmp_path


def test_counts_exact_summary_and_loaders(tmp_path):
    rng = np.random.default_rng(0)
    c1 = rng.integers(-1, 6, size=40)  # -1 is MISSING_ID
    c2 = [list(rng.integers(0, 4, size=rng.integers(0, 3))) for _ in range(40)]
    labels = (rng.random(40) < 0.3).astype(np.float32)
    root = _root(tmp_path, c1, c2, labels)
    summary = write_stats(root, SCHEMA)
    expected = Counter(c1.tolist())
    missing = expected.pop(MISSING_ID, 0)
    ids, counts = load_counts(root, "C1")
    assert ids.tolist() == sorted(expected) and counts.tolist() == [expected[i] for i in sorted(expected)]
    bag_counts = Counter(v for bag in c2 for v in bag)
    assert dict(zip(*map(np.ndarray.tolist, load_counts(root, "C2")))) == bag_counts
    assert load_ids(root, "C1", min_count=5).tolist() == sorted(i for i, n in expected.items() if n >= 5)
    assert summary == load_summary(root) == json.loads((root / "stats" / "summary.json").read_text())
    assert summary["rows"] == 40 and summary["positive_rate"] == pytest.approx(labels.mean())
    assert summary["fields"]["C1"]["missing"] == missing and summary["fields"]["C1"]["distinct"] == len(expected)
    assert summary["fields"]["C1"]["top10_share"] == 1.0  # fewer than 10 distinct IDs
    table = pq.read_table(root / "stats" / "C1.parquet")
    assert table.schema.field("id").type == pa.int64() and table.schema.field("count").type == pa.int64()


@given(st.lists(st.lists(st.integers(-3, 50), max_size=30), max_size=12), st.integers(1, 40))
def test_id_counter_matches_counter(chunks, merge_at):
    counter = IdCounter(merge_at=merge_at)
    for chunk in chunks:
        counter.add(np.array(chunk, dtype=np.int64))
    ids, counts = counter.result()
    expected = Counter(v for chunk in chunks for v in chunk)
    assert ids.tolist() == sorted(expected) and counts.tolist() == [expected[i] for i in sorted(expected)]


def test_missing_stats_say_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="recmem prepare"):
        load_ids(tmp_path, "C1")
    with pytest.raises(FileNotFoundError, match="summary.json"):
        load_summary(tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_criteo_10k_distinct_counts(tmp_path):
    schema = SchemaConfig(event_time=None, true_prob=None)
    raw = RawConfig(path=str(SHARED / "criteo_kaggle_head10k" / "train_10k.txt"), valid_fraction=0.0)
    convert_raw(raw, schema, tmp_path, progress=False)
    fields = write_stats(tmp_path, schema)["fields"]
    # The data README counts an empty value as one more distinct value.
    measured = [175, 386, 5521, 4033, 56, 8, 3184, 93, 3, 2986, 2084, 5284, 1725, 24, 2035, 4724, 9, 1149, 547, 4,
                5037, 8, 12, 2525, 40, 1939]
    assert [fields[f"C{i}"]["distinct"] + (fields[f"C{i}"]["missing"] > 0) for i in range(1, 27)] == measured
