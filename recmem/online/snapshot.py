"""Snapshots of the online model: registered versions, a guardrail on the ``champion`` alias, rollback.

Every ``online.snapshot_every`` windows the newest checkpoint (committed state only) is exported as
an fp32 bundle and registered as a new version of ``online.register_as``. The candidate then faces
the guardrail on the last ``online.guardrail_windows`` windows, each scored before either model
trained on it by the candidate (its test-then-train figures) and now by the champion:

- its mean AUC must not be below the champion's by more than ``online.max_auc_drop``;
- its calibration (mean predicted over observed click rate) must lie in ``online.calibration_range``.

Passing moves ``champion`` to the candidate (the first version becomes champion unopposed); failing
leaves ``champion`` where it is, records the reason as the version's ``recmem.guardrail`` tag and
rolls serving back: the endpoints get the champion in full and no deltas until a later candidate
passes (Ekko's automatic rollback). A server following ``--alias champion`` never moves to a
candidate that failed.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recmem.config import Config

GUARDRAIL_TAG = "recmem.guardrail"


class Snapshotter:
    """Called after each window's commit; every ``snapshot_every`` windows, snapshot and judge.

    Args:
        cfg: the job (``online`` section; tracking for the registry's URI).
        say: where the verdicts go.
        publisher: the delta publisher to roll back and resume (None: no endpoints).
        register: registers the committed model as a new version and returns its number; default:
            the newest checkpoint of ``online.checkpoint_dir``, exported (one process's).
    """

    def __init__(self, cfg: Config, say: Callable[[str], None] = print, publisher: Any = None,
                 register: Callable[[], str] | None = None) -> None:
        from recmem.tracking.logger import default_tracking_uri

        o = cfg.online
        self.cfg, self.say, self.publisher, self.register = cfg, say, publisher, register
        self.name, self.every, self.drop = o.register_as, o.snapshot_every, o.max_auc_drop
        self.low, self.high = o.calibration_range
        self.uri = cfg.tracking.tracking_uri or default_tracking_uri(cfg.workdir)
        self.recent: collections.deque = collections.deque(maxlen=o.guardrail_windows)

    def __call__(self, batches: list, record: dict[str, Any], windows: int) -> dict[str, Any]:
        """Keep the window ``batches`` and its test-then-train ``record``; on schedule, snapshot."""
        self.recent.append((batches, record))
        if windows % self.every:
            return {}
        return self.snapshot(windows)

    def snapshot(self, windows: int) -> dict[str, Any]:
        """Export and register the newest checkpoint, then apply the guardrail; the verdict's figures."""
        from recmem.registry import register_trained, registry_client, set_alias

        if self.register is not None:
            version = self.register()
        else:
            checkpoints = Path(self.cfg.workdir) / self.cfg.online.checkpoint_dir
            version, _ = register_trained(self.cfg, self.name, str(checkpoints))
        candidate = {"auc": float(np.nanmean([r["auc"] for _, r in self.recent])),
                     "calibration": float(np.nanmean([r["calibration"] for _, r in self.recent]))}
        champion = self._champion_scores()
        reason = self._verdict(candidate, champion)
        out = {"snapshot_version": float(version), "snapshot_auc": candidate["auc"],
               "champion_auc": champion["auc"] if champion else math.nan, "guardrail_passed": float(reason is None)}
        if reason is None:
            set_alias(self.name, "champion", version, self.uri)
            self.say(f"recmem online: window {windows}: version {version} is champion (AUC {candidate['auc']:.4f})")
            if self.publisher is not None and self.publisher.paused:
                self.publisher.resume()
            return out
        registry_client(self.uri).set_model_version_tag(self.name, version, GUARDRAIL_TAG, reason)
        self.say(f"recmem online: window {windows}: version {version} stays a candidate: {reason}")
        if self.publisher is not None and champion is not None:
            self.publisher.rollback(champion["bundle"])
        return out

    def _champion_scores(self) -> dict[str, Any] | None:
        """The champion's AUC and calibration on the kept windows, with its bundle; None without one."""
        from recmem.registry import RegistryError, fetch
        from recmem.serving import load_bundle
        from recmem.train.metrics import MetricAccumulator

        try:
            _, folder = fetch(self.name, "champion", Path(self.cfg.workdir) / "serving", self.uri)
        except RegistryError:
            return None
        bundle = load_bundle(folder)
        sparse = list(self.cfg.data.schema.sparse)
        aucs, calibrations = [], []
        for batches, _ in self.recent:
            acc = MetricAccumulator("c")
            for batch in batches:
                kjt = batch.sparse_features
                acc.update(batch, bundle.logits(batch.dense_features, [kjt[f].values() for f in sparse],
                                                [kjt[f].lengths().long() for f in sparse]))
            scores = acc.compute()
            aucs.append(scores["c/auc"])
            calibrations.append(scores["c/calibration"])
        return {"auc": float(np.nanmean(aucs)), "calibration": float(np.nanmean(calibrations)), "bundle": bundle}

    def _verdict(self, candidate: dict[str, float], champion: dict[str, Any] | None) -> str | None:
        """Why the candidate may not be champion, or None when it may."""
        if not self.low <= candidate["calibration"] <= self.high:
            return (f"calibration {candidate['calibration']:.3f} outside online.calibration_range "
                    f"[{self.low:g}, {self.high:g}]")
        if champion is not None and candidate["auc"] < champion["auc"] - self.drop:
            return (f"AUC {candidate['auc']:.4f} on the last {len(self.recent)} windows, the champion's "
                    f"{champion['auc']:.4f}: below it by more than online.max_auc_drop={self.drop:g}")
        return None
