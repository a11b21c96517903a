"""``recmem serve``: load the model, start the HTTP server, follow the alias, stop on Ctrl-C / SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from recmem.serve.http import ModelHTTPServer
from recmem.serve.limits import Limits
from recmem.serve.service import ModelService
from recmem.serve.source import AliasWatcher, load_alias, load_folder


@dataclass(frozen=True)
class ServeOptions:
    """What ``recmem serve`` was asked for.

    Args:
        bundle: a bundle folder to serve (or None with ``model``).
        model, alias: a registered model and the alias to follow (or None with ``bundle``).
        name: the model's name in answers (default: ``model``, else ``recmem``).
        host, port: where to listen.
        poll_s: seconds between alias polls.
        dest: where fetched versions go.
        tracking_uri: the MLflow tracking / registry URI.
        limits: request bounds.
        torch_threads: torch intra-op threads. 1 by default: each connection has its own thread, and
            a multi-threaded torch call made from such a thread cost 3 ms more per 1-row request and
            12 ms more per 256-row one than a single-threaded call (BENCHMARKS.md, "Serving latency").
    """

    bundle: str | None
    model: str | None
    alias: str
    name: str | None
    host: str
    port: int
    poll_s: float
    dest: Path
    tracking_uri: str | None
    limits: Limits
    torch_threads: int = 1


def serve(opts: ServeOptions) -> int:
    """Serve until interrupted (Ctrl-C, SIGTERM); returns the exit status."""
    import torch

    torch.set_num_threads(opts.torch_threads)
    watcher = None
    if opts.model:
        from recmem.registry import alias_version, fetch  # MLflow only when a registry is used

        served = load_alias(opts.model, opts.alias, opts.dest, opts.tracking_uri, fetch)
        service = ModelService(opts.name or opts.model, served, opts.limits)
        watcher = AliasWatcher(service, opts.model, opts.alias, opts.dest, opts.tracking_uri, opts.poll_s,
                               alias_version, fetch)
    else:
        service = ModelService(opts.name or "recmem", load_folder(opts.bundle), opts.limits)
    server = ModelHTTPServer((opts.host, opts.port), service)
    served = service.served
    origin = f"{opts.model}@{opts.alias} = version {served.registry_version}, " if opts.model else ""
    print(f"recmem serve: {origin}bundle {served.bundle.version} on http://{opts.host}:{server.port} "
          f"(POST /predict, POST /delta, GET /health, GET /metrics)", file=sys.stderr, flush=True)
    if watcher:
        watcher.start()
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if watcher:
            watcher.stop()
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
