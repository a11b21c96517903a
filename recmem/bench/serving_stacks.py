"""Peers of the embedded server's HTTP front, for the stack comparison in BENCHMARKS.md ("Serving
latency"): the same :class:`~recmem.serve.service.ModelService` behind Starlette on uvicorn
(httptools, uvloop) and behind aiohttp. Only ``/predict`` and ``/health``: what the benchmark uses.

    python -m recmem.bench.serving_stacks --stack starlette --bundle FOLDER --port 8001
"""

from __future__ import annotations

import argparse
import sys

from recmem.serve.service import ModelService
from recmem.serve.source import load_folder

STACKS = ("starlette", "aiohttp")


def run_starlette(service: ModelService, port: int) -> None:
    """Serve with Starlette on uvicorn; the model runs inline on the event loop (no thread hop)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def predict(request: Request) -> JSONResponse:
        status, payload = service.predict(await request.body())
        return JSONResponse(payload, status_code=status)

    async def health(request: Request) -> JSONResponse:
        status, payload = service.health()
        return JSONResponse(payload, status_code=status)

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_aiohttp(service: ModelService, port: int) -> None:
    """Serve with aiohttp's web server; the model runs inline on the event loop."""
    from aiohttp import web

    async def predict(request: web.Request) -> web.Response:
        status, payload = service.predict(await request.read())
        return web.json_response(payload, status=status)

    async def health(request: web.Request) -> web.Response:
        status, payload = service.health()
        return web.json_response(payload, status=status)

    app = web.Application(client_max_size=service.limits.max_body_bytes)
    app.add_routes([web.post("/predict", predict), web.get("/health", health)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=STACKS, required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    service = ModelService("recmem", load_folder(args.bundle))
    {"starlette": run_starlette, "aiohttp": run_aiohttp}[args.stack](service, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
