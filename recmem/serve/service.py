"""The transport-free core of the prediction server: one live bundle, requests in and answers out.

:class:`ModelService` takes request bodies as bytes and returns ``(status, JSON object)``; the HTTP
front (``recmem/serve/http.py``) and the Ray Serve deployment (``deploy/serve/``) only move bytes.
Guarantees:

- **Swaps drop nothing.** The live bundle is one reference. A request reads it once and finishes on
  that bundle, however the reference moves meanwhile; a new version (a delta, a registry alias that
  moved) is fully built and loaded before the reference is swapped.
- **Deltas are atomic.** ``POST /delta`` builds a new bundle from the live one (``Bundle.apply_delta``
  leaves the live one unchanged) under a lock, so two deltas never both apply to the same base; a
  delta for another base version is a 409 and a malformed one a 400, and the model stays as it was.
- **Bad input is a 4xx naming the field**, never a 5xx: the body is bounded in bytes before it is
  read and in rows before it is parsed, JSON is parsed strictly (NaN and Infinity refused), and
  nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from recmem.serve.limits import Limits
from recmem.serve.metrics import ServerMetrics
from recmem.serving import Bundle, DeltaConflict, InputError

Answer = tuple[int, dict[str, Any]]
"""An HTTP status and the JSON object to send with it."""


class BadRequest(ValueError):
    """A request refused before the model sees it; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Served:
    """The live model: the bundle and where it came from (``registry_version``: None for a folder)."""

    bundle: Bundle
    registry_version: str | None = None


class ModelService:
    """Answers ``/predict``, ``/delta``, ``/health`` and ``/metrics`` from one live bundle.

    Thread-safe: any number of threads may call :meth:`predict` while another swaps the model.

    Args:
        name: the model's name in answers and metrics (the registry name, or one given).
        served: the first model.
        limits: request bounds.
        clock: seconds for latency (``time.perf_counter`` unless a test passes its own).
    """

    def __init__(self, name: str, served: Served, limits: Limits = Limits(), clock=time.perf_counter) -> None:
        self.name, self.limits, self._clock = name, limits, clock
        self._served = served
        self._delta_lock = threading.Lock()
        self.metrics = ServerMetrics()
        self.metrics.model(name, served.bundle.version, served.registry_version)

    @property
    def served(self) -> Served:
        """The live model (read once per request)."""
        return self._served

    def swap(self, served: Served) -> None:
        """Make ``served`` the live model; requests already running finish on the old one."""
        with self._delta_lock:  # a delta being built on the old base must not land after this
            self._served = served
            self.metrics.model(self.name, served.bundle.version, served.registry_version)

    def predict(self, body: bytes) -> Answer:
        """``POST /predict``: ``{"rows": [{field: value}, ...]}`` -> probabilities."""
        start = self._clock()
        served = self._served  # this request's model, whatever swaps meanwhile
        count = None
        try:
            rows = _rows_of(self._json(body, self.limits.max_body_bytes), self.limits.max_rows)
            probabilities = served.bundle.predict(rows, self.limits.max_rows, max_bag=self.limits.max_bag)
            answer, count = (200, {"probabilities": probabilities, **self._identity(served)}), len(rows)
        except BadRequest as e:
            answer = e.status, {"error": str(e)}
        except InputError as e:
            answer = 400, {"error": str(e)}
        self.metrics.request("predict", answer[0], self._clock() - start, count)
        return answer

    def delta(self, body: bytes) -> Answer:
        """``POST /delta``: apply a row delta (``recmem/serving/bundle.py`` gives its format)."""
        start = self._clock()
        try:
            delta = self._json(body, self.limits.max_delta_bytes)
            with self._delta_lock:
                served = self._served
                self._served = Served(served.bundle.apply_delta(delta), served.registry_version)
                self.metrics.model(self.name, self._served.bundle.version, served.registry_version)
            answer = 200, {**self._identity(self._served), "base_version": served.bundle.version}
        except BadRequest as e:
            answer = e.status, {"error": str(e)}
        except DeltaConflict as e:
            answer = 409, {"error": str(e)}
        except InputError as e:
            answer = 400, {"error": str(e)}
        self.metrics.request("delta", answer[0], self._clock() - start, None)
        return answer

    def health(self) -> Answer:
        """``GET /health``: the live model's name and versions."""
        return 200, {"status": "ok", **self._identity(self._served)}

    def _identity(self, served: Served) -> dict[str, Any]:
        out = {"model": self.name, "version": served.bundle.version}
        if served.registry_version is not None:
            out["registry_version"] = served.registry_version
        return out

    @staticmethod
    def _json(body: bytes, limit: int) -> Any:
        if len(body) > limit:
            raise BadRequest(413, f"body of {len(body):,} bytes is more than the limit of {limit:,}")
        return parse_json(body)


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity, no numbers too long to read.

    Raises:
        BadRequest: 400, saying where the JSON is broken.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"body is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # a constant or float refused below, or an integer of too many digits
        raise BadRequest(400, f"malformed JSON: {str(e)[:200]}") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (send null for a missing value)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text[:40]} is out of the float range")
    return x


def _rows_of(request: Any, max_rows: int) -> list:
    if not isinstance(request, dict):
        raise BadRequest(400, f'body must be an object {{"rows": [...]}}, got {type(request).__name__}')
    extra = sorted(str(k) for k in request if k != "rows")
    if extra:
        raise BadRequest(400, f"unknown field {extra[0][:64]!r} (the body holds only rows)")
    if "rows" not in request:
        raise BadRequest(400, "missing field 'rows'")
    rows = request["rows"]
    if not isinstance(rows, list):
        raise BadRequest(400, f"field 'rows' must be a list of objects, got {type(rows).__name__}")
    if len(rows) > max_rows:
        raise BadRequest(413, f"field 'rows': {len(rows)} rows is more than the limit of {max_rows} per request")
    return rows
