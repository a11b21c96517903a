"""Benchmarks: one module per benchmark, each run by a thin entry point in ``jobs/``.

- ``throughput.py`` (``jobs/bench_train.py``): recmem's training step against torchrec's, with
  the peers in ``peers.py``, recmem's step cut into phases by ``phases.py``, and the output written
  by ``throughput_report.py``.
- ``collisionless_map.py`` (``jobs/bench_collisionless.py``): the collisionless ID -> row map
  against a dict and torchrec's MCH.
- ``collisionless_train.py`` (``jobs/bench_collisionless_train.py``): training on collisionless
  tables against ``full`` tables.
- ``collisionless_drift.py`` (``jobs/collisionless_drift.py``): TTL and admission on drifting data
  against no expiry and the hashing trick.
- ``scaling.py`` (``jobs/bench_scaling.py``): Ray workers, bytes per step, a projection.
- ``ray_path.py`` (``jobs/bench_ray.py``): ``recmem train`` on Ray against the single-process loop:
  pass rates, start-up to the first step, the data stream per worker.
- ``frontier.py`` (``recmem frontier``, ``jobs/frontier.py``): the memory/quality frontier of the table
  kinds at 1x-64x less memory than ``full``, each kind's sizing and training in ``frontier_kinds.py``,
  the table, plot and targets in ``frontier_report.py``.
"""


def free_port() -> int:
    """A local TCP port the OS just had free (for a benchmark's server or gloo group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
