"""Benchmarks: recmem measured against its peers in one process, on the same inputs (``jobs/bench_*.py``)."""
