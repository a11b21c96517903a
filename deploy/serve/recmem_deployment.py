"""recmem's model server as a Ray Serve deployment: the same :class:`~recmem.serve.service.ModelService`
as ``recmem serve``, one per replica, behind Ray Serve's HTTP proxy.

    serve run --app-dir deploy/serve recmem_deployment:build bundle=/path/to/bundle num_replicas=2
    serve run --app-dir deploy/serve recmem_deployment:build model=NAME alias=champion poll_s=30
    serve run deploy/serve/config.yaml                        # the same, from a config file

Routes as the embedded server: ``POST /predict``, ``POST /delta``, ``GET /health``, ``GET /metrics``.
Each replica holds its own model (and, with ``model=``, follows the alias by itself) and its own
metrics. A delta reaches the one replica that receives it: push deltas to the embedded server, or
run one replica, until deltas are broadcast (see README.md here).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ray import cloudpickle, serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from recmem.serve.limits import Limits
from recmem.serve.metrics import CONTENT_TYPE
from recmem.serve.service import ModelService
from recmem.serve.source import AliasWatcher, load_alias, load_folder


@serve.deployment(max_ongoing_requests=16)
class RecmemModel:
    """One replica: a model service answering Ray Serve's HTTP requests.

    Args:
        bundle: a bundle folder (every replica's node must see it), or None with ``model``.
        model, alias: a registered model and the alias to follow.
        name: the model name in answers.
        tracking_uri: MLflow tracking / registry URI (with ``model``).
        dest: where fetched versions go (with ``model``).
        poll_s: seconds between alias polls.
        limits: :class:`~recmem.serve.limits.Limits` fields.
    """

    def __init__(self, bundle: str | None = None, model: str | None = None, alias: str = "champion",
                 name: str | None = None, tracking_uri: str | None = None, dest: str = "serving",
                 poll_s: float = 30.0, limits: dict[str, int] | None = None) -> None:
        self.limits = Limits(**(limits or {}))
        self.watcher = None
        if model:
            from recmem.registry import alias_version, fetch

            served = load_alias(model, alias, Path(dest), tracking_uri, fetch)
            self.service = ModelService(name or model, served, self.limits)
            self.watcher = AliasWatcher(self.service, model, alias, Path(dest), tracking_uri, poll_s,
                                        alias_version, fetch)
            self.watcher.start()
        elif bundle:
            self.service = ModelService(name or "recmem", load_folder(bundle), self.limits)
        else:
            raise ValueError("RecmemModel needs bundle=FOLDER or model=NAME")

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if method == "GET" and path == "/health":
            return _json(*self.service.health())
        if method == "GET" and path == "/metrics":
            return Response(self.service.metrics.text(), media_type=CONTENT_TYPE)
        if method != "POST" or path not in ("/predict", "/delta"):
            return _json(404, {"error": f"no {method} {path[:100]}"})
        limit = self.limits.max_body_bytes if path == "/predict" else self.limits.max_delta_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused unread
            return _json(413, {"error": f"body of {int(declared):,} bytes is more than the limit of {limit:,}"})
        body = await _bounded_body(request, limit)
        if body is None:
            return _json(413, {"error": f"body is more than the limit of {limit:,} bytes"})
        return _json(*(self.service.predict(body) if path == "/predict" else self.service.delta(body)))

    def __del__(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` bytes (a chunked body has no length to check first)."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _json(status: int, payload: dict[str, Any]) -> Response:
    return JSONResponse(payload, status_code=status)


def build(args: dict[str, str]) -> serve.Application:
    """The application for ``serve run ... recmem_deployment:build key=value ...``.

    Keys: ``bundle`` or ``model`` (with ``alias``, ``tracking_uri``, ``dest``, ``poll_s``), ``name``,
    ``num_replicas`` (default 1), ``num_cpus`` per replica (default 1), and the limits
    ``max_body_bytes``, ``max_rows``, ``max_bag``, ``max_delta_bytes``.
    """
    args = dict(args)
    replicas, cpus = int(args.pop("num_replicas", 1)), float(args.pop("num_cpus", 1))
    limits = {k: int(args.pop(k)) for k in list(args) if k in Limits.__dataclass_fields__}
    if "poll_s" in args:
        args["poll_s"] = float(args["poll_s"])
    unknown = sorted(set(args) - {"bundle", "model", "alias", "name", "tracking_uri", "dest", "poll_s"})
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}")
    # This file is not an installed module: replicas get its code with the deployment instead of
    # importing it by name (recmem itself must be installed on every node).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    deployment = RecmemModel.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus})
    return deployment.bind(limits=limits, **args)
