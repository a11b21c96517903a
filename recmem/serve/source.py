"""Where the served model comes from: a bundle folder, or an MLflow Model Registry alias that is
watched and followed.

MLflow never reloads a served model when an alias moves, so :class:`AliasWatcher` polls the alias
every ``interval_s`` seconds. When it names another version, the new bundle is fetched and loaded
completely (files verified, dense part compiled) while the old one keeps answering; only then is
the live reference swapped (:meth:`ModelService.swap`). A fetch or load that fails leaves the old
model serving and is retried at the next poll.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Callable

from recmem.serve.service import ModelService, Served
from recmem.serving import load_bundle

AliasVersion = Callable[[str, str, str | None], str]
"""``alias_version(name, alias, tracking_uri) -> version`` (``recmem.registry.alias_version``)."""
Fetch = Callable[[str, str, Path, str | None], tuple[str, Path]]
"""``fetch(name, alias, dest, tracking_uri) -> (version, bundle folder)`` (``recmem.registry.fetch``)."""


def load_folder(path: str | Path) -> Served:
    """The bundle in ``path`` (a bundle folder), loaded and verified."""
    return Served(load_bundle(Path(path)))


def load_alias(name: str, alias: str, dest: Path, tracking_uri: str | None, fetch: Fetch) -> Served:
    """The version ``name@alias`` names now, fetched under ``dest`` and loaded."""
    version, folder = fetch(name, alias, dest, tracking_uri)
    return Served(load_bundle(folder), str(version))


class AliasWatcher:
    """Follows a registry alias: polls it and swaps the service to each new version it names.

    Args:
        service: the service to swap.
        name, alias: the registered model and the alias to follow.
        dest: folder the fetched versions go to.
        tracking_uri: the MLflow tracking (and registry) URI; None: MLflow's default.
        interval_s: seconds between polls.
        alias_version, fetch: the registry calls (``recmem.registry``'s, or a test's).
    """

    def __init__(self, service: ModelService, name: str, alias: str, dest: Path, tracking_uri: str | None,
                 interval_s: float, alias_version: AliasVersion, fetch: Fetch) -> None:
        self.service, self.name, self.alias, self.dest = service, name, alias, Path(dest)
        self.tracking_uri, self.interval_s = tracking_uri, interval_s
        self._alias_version, self._fetch = alias_version, fetch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Poll once; True when the service now serves another version."""
        version = str(self._alias_version(self.name, self.alias, self.tracking_uri))
        if version == self.service.served.registry_version:
            return False
        served = load_alias(self.name, self.alias, self.dest, self.tracking_uri, self._fetch)
        if served.registry_version == self.service.served.registry_version:
            return False  # the alias moved back between the two calls
        self.service.swap(served)
        print(f"recmem serve: now serving {self.name} version {served.registry_version} "
              f"({served.bundle.version})", file=sys.stderr, flush=True)
        return True

    def start(self) -> None:
        """Poll in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="recmem-serve-alias", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (waits for a poll in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as e:  # registry, network or bundle: a poller that died would serve stale forever
                print(f"recmem serve: keeping version {self.service.served.registry_version}: {e}",
                      file=sys.stderr, flush=True)
