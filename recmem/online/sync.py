"""Row deltas from the online loop to the model servers' ``POST /delta`` (format: ``recmem/serving/bundle.py``).

What changed since the last push, per table:

- tables that report their changes (``take_changes``: ``collisionless``) give the IDs whose rows
  were updated and the IDs evicted since the last call, in time proportional to the rows touched;
  evicted IDs become ``deleted``. The block needs ``options.track_changes: true`` (checked at start)
  or evictions would never reach serving;
- other kinds with keyed or modulo serving forms (``full``, ``hash``) are compared with the forms
  last pushed: the delta still holds only the rows that differ, but finding them reads the table.

Changes are collected after every window (the loop calls the publisher right after the checkpoint
that holds them, so nothing a crash can take back is ever published) and pushed at most every
``online.sync_interval_s``; the dense weights go with the first delta and every ``online.dense_every``-th.

Versions: a delta takes an endpoint from ``base_version`` to ``w<windows>-s<step>`` of this loop.
The first push to an endpoint in a run, and any push the endpoint refuses with 409 (it holds another
version: restarted, rolled back, or fed by another loop), is a *full resend* instead: every live row
and the dense weights, based on the version the endpoint reports at ``GET /health``. A crash between
the checkpoint and the push therefore costs nothing: the restarted loop's first push is a full
resend. A full resend replaces each keyed table's IDs (``replace``: IDs the server holds and the
model no longer has are dropped), so it also repairs a server that missed deletions. The server
applies each delta atomically, so it answers from the old version or the new one, never a mix. A
``full`` table's shared out-of-vocabulary row is not a keyed row and travels with snapshots only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from recmem.config import Config, ConfigError

SYNCED_LOOKUPS = ("keyed", "modulo")


class DeltaPublisher:
    """Collects each window's changed rows and pushes them to ``cfg.online.endpoints``.

    Args:
        cfg: the job (``online`` section; the model's table blocks are checked).
        model: the training model (a ``CTRModel``).
        say: where a failed push is reported.
        post: ``post(url, body) -> (status, JSON answer)``; HTTP by default (tests pass their own).
        clock: seconds for the sync interval.

    Raises:
        ConfigError: a table kind whose serving form no delta can carry, or a collisionless block
            without ``options.track_changes``.
    """

    def __init__(self, cfg: Config, model: Any, say: Callable[[str], None] = print,
                 post: Callable[[str, bytes], tuple[int, dict]] | None = None, clock=time.monotonic) -> None:
        self.endpoints = list(cfg.online.endpoints)
        self.interval, self.dense_every = cfg.online.sync_interval_s, cfg.online.dense_every
        self.model, self.say, self.clock = model, say, clock
        self.post = post or http_post
        self.features = list(cfg.data.schema.sparse)
        _check_tables(cfg, model)
        self._tracked = [t for t in model.tables.tables if hasattr(t, "take_changes")]
        self._compared = [t for t in model.tables.tables if not hasattr(t, "take_changes")]
        self._pushed_forms: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, dict[int, torch.Tensor]] = {}  # feature -> {id: row}
        self._deleted: dict[str, set[int]] = {}
        self._held: dict[str, str | None] = {e: None for e in self.endpoints}  # None: full resend next
        self._last_push = -float("inf")
        self._pushes = 0
        self.failures = 0
        self.paused = False
        """True after a rollback: changes are collected, nothing is pushed (:meth:`resume`)."""

    def __call__(self, session: Any, windows: int) -> dict[str, Any]:
        """After the commit of window ``windows``: collect its changes; push when the interval is up.

        Returns:
            The push's figures for the window's record (``delta_rows``, ``delta_version``,
            ``delta_seconds``, ``delta_full``, ``delta_failures``), empty when nothing was pushed.
        """
        self.collect()
        if self.paused:  # serving holds the champion; the next push after resume() is a full resend
            self.discard()
            return {}
        if self.clock() - self._last_push < self.interval:
            return {}
        version = f"w{windows}-s{session.step}"
        start = self.clock()
        dense = self._pushes % self.dense_every == 0
        rows, full = 0, 0
        for endpoint in self.endpoints:
            pushed = self._push(endpoint, version, dense)
            if pushed is None:
                self.failures += 1
                continue
            rows, full = max(rows, pushed[0]), full + pushed[1]
        self.discard()
        self._last_push, self._pushes = self.clock(), self._pushes + 1
        return {"delta_rows": rows, "delta_version": version, "delta_seconds": self.clock() - start,
                "delta_full": full, "delta_failures": self.failures}

    def collect(self) -> None:
        """Move the tables' changes since the last call into the pending delta."""
        for table in self._tracked:
            for name, change in table.take_changes().items():
                rows = self._pending.setdefault(name, {})
                deleted = self._deleted.setdefault(name, set())
                for i in change["freed"].tolist():
                    rows.pop(i, None)
                    deleted.add(i)
                for i, row in zip(change["ids"].tolist(), change["weights"]):
                    rows[i] = row
                    deleted.discard(i)
        for table in self._compared:
            for name, form in zip(table.feature_names, table.to_serving()):
                ids, rows, gone = changed_rows(self._pushed_forms.get(name), form.tensors)
                pending, deleted = self._pending.setdefault(name, {}), self._deleted.setdefault(name, set())
                pending.update(zip(ids.tolist(), rows))
                deleted.update(gone.tolist())
                deleted.difference_update(ids.tolist())
                self._pushed_forms[name] = form.tensors

    def rollback(self, bundle: Any) -> int:
        """Send every endpoint ``bundle`` in full (``Bundle.full_delta``) and hold back deltas until
        :meth:`resume`; returns how many endpoints took it."""
        self.paused, done = True, 0
        for endpoint in self.endpoints:
            status, answer = self.post(f"{endpoint}/health", b"")
            if status == 200:
                status, answer = self.post(f"{endpoint}/delta", _encode(bundle.full_delta(answer["version"])))
            if status == 200:
                done += 1
            else:
                self.say(f"recmem online: {endpoint} did not take the rollback ({status}: {answer.get('error')})")
            self._held[endpoint] = None  # deltas resume with a full resend
        return done

    def resume(self) -> None:
        """Push deltas again (after a rollback), starting with a full resend to every endpoint."""
        self.paused = False
        self._held = {e: None for e in self.endpoints}

    def discard(self) -> None:
        """Drop the pending changes (they were pushed, or a full resend covers them)."""
        self._pending, self._deleted = {}, {}

    def delta(self, base: str, version: str, dense: bool) -> dict[str, Any]:
        """The pending changes as a delta from ``base`` to ``version`` (dense weights if ``dense``)."""
        tables = {}
        for name in self.features:
            rows, deleted = self._pending.get(name, {}), self._deleted.get(name, set())
            if rows or deleted:
                tables[name] = {"ids": list(rows), "rows": [r.tolist() for r in rows.values()],
                                "deleted": sorted(deleted)}
        out: dict[str, Any] = {"base_version": base, "version": version, "tables": tables}
        if dense:
            out["dense"] = dense_weights(self.model)
        return out

    def full(self, base: str, version: str) -> dict[str, Any]:
        """Every live row and the dense weights, as a delta from ``base`` to ``version``."""
        tables = {}
        for name, form in zip(self.features, self.model.tables.to_serving()):
            t = form.tensors
            ids = t["keys"] if form.lookup == "keyed" else torch.arange(len(t["rows"]))
            tables[name] = {"ids": ids.tolist(), "rows": t["rows"].tolist(), "replace": form.lookup == "keyed"}
        return {"base_version": base, "version": version, "tables": tables, "dense": dense_weights(self.model)}

    def _push(self, endpoint: str, version: str, dense: bool) -> tuple[int, int] | None:
        """Push to one endpoint: the pending delta, or a full resend when it needs one. Returns
        (rows sent, 1 if it was a full resend), or None when the endpoint could not be updated."""
        base = self._held[endpoint]
        if base is not None:
            body = self.delta(base, version, dense)
            status, answer = self.post(f"{endpoint}/delta", _encode(body))
            if status == 200:
                self._held[endpoint] = version
                return sum(len(t["ids"]) + len(t["deleted"]) for t in body["tables"].values()), 0
            if status != 409:  # unreachable, or refused: it gets everything once it answers again
                self.say(f"recmem online: {endpoint}/delta refused the delta ({status}: {answer.get('error')}); "
                         "a full resend follows at the next sync")
                self._held[endpoint] = None
                return None
            self.say(f"recmem online: {endpoint} holds another version ({answer.get('error')}); resending in full")
        status, health = self.post(f"{endpoint}/health", b"")
        if status != 200:
            self.say(f"recmem online: {endpoint}/health answered {status}; will retry at the next sync")
            self._held[endpoint] = None
            return None
        body = self.full(health["version"], version)
        status, answer = self.post(f"{endpoint}/delta", _encode(body))
        if status != 200:
            self.say(f"recmem online: {endpoint} refused the full resend ({status}: {answer.get('error')})")
            self._held[endpoint] = None
            return None
        self._held[endpoint] = version
        return sum(len(t["ids"]) for t in body["tables"].values()), 1


def check_shared_tables(cfg: Config) -> None:
    """Refuse, naming the key, table blocks whose deltas several workers cannot send.

    Raises:
        ConfigError: a block of a kind that does not record its changed rows.
    """
    for i, block in enumerate(cfg.model.tables):
        if block.kind != "collisionless":
            raise ConfigError(f"model.tables.{i}.kind={block.kind}: with online.endpoints on "
                              f"ray.num_workers={cfg.ray.num_workers} workers only collisionless tables (which "
                              "record their changed rows) send deltas; use one worker for other kinds")


class _NotGathered(Exception):
    """A full resend asked for the whole tables where the workers had not gathered them."""


class _GatheredTables:
    """Rank 0's stand-in for a sharded model's tables: the changes and forms the workers gathered."""

    def __init__(self, features: list[str]) -> None:
        self.feature_names = features
        self.tables = [self]
        self.changes: dict[str, dict[str, torch.Tensor]] = {}
        self.forms: list[Any] | None = None

    def take_changes(self) -> dict[str, dict[str, torch.Tensor]]:
        changes, self.changes = self.changes, {}
        return changes

    def to_serving(self) -> list[Any]:
        if self.forms is None:
            raise _NotGathered
        return self.forms


class SharedDeltaPublisher(DeltaPublisher):
    """The delta publisher of several workers, on rank 0 (``online/workers.py``): after each commit
    the workers hand rank 0 their changed rows (``distributed.gather_changes``), and the whole tables
    (``distributed.gather_forms``) only when a push is due that starts with a full resend
    (:meth:`wants_forms`). An endpoint that asks for a full resend in the middle of a push (409) gets
    it at the next sync. Only tables that record their changes can be synced so.

    Args:
        cfg, say, post: as :class:`DeltaPublisher`.
        model: this worker's model (its dense layers are every worker's: DDP).
        forms: the whole tables now (``gather_forms``), for the checks at start.

    Raises:
        ConfigError: as :class:`DeltaPublisher`, or a block whose kind does not record its changes.
    """

    def __init__(self, cfg: Config, model: Any, forms: list[Any], say: Callable[[str], None] = print,
                 post: Callable[[str, bytes], tuple[int, dict]] | None = None) -> None:
        check_shared_tables(cfg)
        self.gathered = _GatheredTables(list(cfg.data.schema.sparse))
        self.gathered.forms = forms
        super().__init__(cfg, SimpleNamespace(tables=self.gathered, dense=model.dense), say, post)
        self.gathered.forms = None

    def wants_forms(self) -> bool:
        """Whether the push after this window is due and starts with a full resend to an endpoint."""
        due = not self.paused and self.clock() - self._last_push >= self.interval
        return due and any(held is None for held in self._held.values())

    def publish(self, session: Any, windows: int, changes: dict[str, dict[str, torch.Tensor]],
                forms: list[Any] | None) -> dict[str, Any]:
        """:meth:`DeltaPublisher.__call__` with the workers' gathered ``changes`` (and ``forms``)."""
        self.gathered.changes, self.gathered.forms = changes, forms
        try:
            return self(session, windows)
        finally:
            self.gathered.forms = None

    def _push(self, endpoint: str, version: str, dense: bool) -> tuple[int, int] | None:
        try:
            return super()._push(endpoint, version, dense)
        except _NotGathered:
            self.say(f"recmem online: {endpoint} needs a full resend; it follows at the next sync")
            self._held[endpoint] = None
            return None


def changed_rows(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of serving form ``new`` that differ from ``old`` (keyed: by ID; modulo: by row number).

    Returns:
        (ids [k] int64, rows [k, D], ids gone since ``old`` [m] int64).
    """
    rows = new["rows"]  # [n, D]
    keys = new["keys"] if "keys" in new else torch.arange(len(rows))
    if old is None:
        return keys, rows, torch.zeros(0, dtype=torch.int64)
    old_keys = old["keys"] if "keys" in old else torch.arange(len(old["rows"]))
    pos = torch.searchsorted(old_keys, keys).clamp_(max=max(len(old_keys) - 1, 0))
    same = (old_keys[pos] == keys) if len(old_keys) else torch.zeros(len(keys), dtype=torch.bool)
    same &= (old["rows"][pos] == rows).all(dim=1) if len(old_keys) else same
    gone = old_keys[~torch.isin(old_keys, keys)]
    return keys[~same], rows[~same], gone


def dense_weights(model: Any) -> dict[str, list]:
    """The dense part's state as the bundle's dense module names it (``export_dense`` exports this module)."""
    dense = getattr(model.dense, "module", model.dense)
    return {k: v.detach().float().tolist() for k, v in dense.state_dict().items() if v.is_floating_point()}


def http_post(url: str, body: bytes, timeout_s: float = 10.0) -> tuple[int, dict]:
    """POST ``body`` (GET when empty) and read the JSON answer: (status, object); a failure to
    connect is status 0 with the reason as its error."""
    request = urllib.request.Request(url, data=body or None, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except json.JSONDecodeError:
            return e.code, {"error": e.reason}
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        return 0, {"error": str(getattr(e, "reason", e))}


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, allow_nan=False).encode()


def _check_tables(cfg: Config, model: Any) -> None:
    """Refuse blocks whose rows no delta carries, naming the key."""
    for i, block in enumerate(cfg.model.tables):
        if block.kind == "collisionless" and not block.options.get("track_changes"):
            raise ConfigError(f"model.tables.{i}.options.track_changes: must be true for online.endpoints "
                              "(evicted IDs reach serving only when the table records them)")
    for name, form in zip(cfg.data.schema.sparse, model.tables.to_serving()):
        if form.lookup not in SYNCED_LOOKUPS or "projection" in form.tensors:
            raise ConfigError(f"online.endpoints: feature {name!r} is served by a {form.lookup!r} lookup"
                              f"{' with a projection' if 'projection' in form.tensors else ''}; row deltas carry "
                              f"only {' and '.join(SYNCED_LOOKUPS)} tables without one (full, hash, collisionless)")
