"""Request bounds of the server (no heavy imports: the CLI reads the defaults for its help)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may hold.

    Args:
        max_body_bytes: largest ``/predict`` body.
        max_rows: most rows in one ``/predict``.
        max_bag: most IDs in one multi-hot bag.
        max_delta_bytes: largest ``/delta`` body.
    """

    max_body_bytes: int = 4 << 20
    max_rows: int = 4096
    max_bag: int = 1024
    max_delta_bytes: int = 256 << 20
