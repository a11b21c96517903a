"""The SSD benchmark (``jobs/bench_ssd.py``) at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json

import pytest

from jobs.bench_ssd import main


def test_quick_run_measures_the_three_variants(capsys, tmp_path):
    main(["--quick", "--folder", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    sps = record["samples_per_second"]
    assert set(sps) == {"ram", "ssd_no_prefetch", "ssd_prefetch"} and all(v > 0 for v in sps.values())
    assert record["prefetch_vs_ram"] == pytest.approx(sps["ssd_prefetch"] / sps["ram"])
    prefetch = record["ssd_stats"]["ssd_prefetch"]
    assert 0 < prefetch["cache_hit_rate"] < 1 and prefetch["misses_per_step"] > 0
    assert record["disk_reads_per_second"] > 0 and record["peak_rss_ssd"] > record["rss_baseline"] > 0
    assert lines[0].startswith("cpu capability: ")


def test_formats_compares_the_block_file_with_the_peers_present(capsys, tmp_path):
    main(["--formats", "--quick", "--folder", str(tmp_path)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["formats"]["block"] > 0
    assert all(isinstance(v, float) or v.startswith("not installed") for v in record["formats"].values())
