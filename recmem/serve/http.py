"""The embedded HTTP front of :class:`~recmem.serve.service.ModelService`: the standard library's
``ThreadingHTTPServer`` (a thread per connection, HTTP/1.1 keep-alive).

Chosen by measured latency over Starlette on uvicorn and aiohttp (BENCHMARKS.md, "Serving latency"):
those answer a lone 1-row request ~1 ms sooner, but with the model's synchronous torch work on their one
event loop they stalled for seconds under concurrent or 256-row load; this server never did.

Routes: ``POST /predict``, ``POST /delta``, ``GET /health``, ``GET /metrics``. A body needs a
``Content-Length`` (411 without one) and is refused unread above the endpoint's limit (413).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from recmem.serve.metrics import CONTENT_TYPE
from recmem.serve.service import ModelService

_POST = {"/predict", "/delta"}
_GET = {"/health", "/metrics"}


class ModelHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server answering from ``service``.

    Args:
        address: ``(host, port)``; port 0 picks a free one (see :attr:`port`).
        service: the model service.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: ModelService) -> None:
        self.service = service
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.server_address[1]

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (stop with ``shutdown()`` then ``server_close()``)."""
        thread = threading.Thread(target=self.serve_forever, name="recmem-serve-http", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: ModelHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        service = self.server.service
        if self.path == "/metrics":
            self._send(200, service.metrics.text(), CONTENT_TYPE)
        elif self.path == "/health":
            self._json(*service.health())
        else:
            self._json(405 if self.path in _POST else 404, {"error": f"no GET {self.path[:100]}"})

    def do_POST(self) -> None:  # noqa: N802
        service = self.server.service
        if self.path not in _POST:
            self._json(405 if self.path in _GET else 404, {"error": f"no POST {self.path[:100]}"})
            return
        limit = service.limits.max_body_bytes if self.path == "/predict" else service.limits.max_delta_bytes
        body = self._body(limit)
        if body is None:
            return
        try:
            answer = service.predict(body) if self.path == "/predict" else service.delta(body)
        except Exception as e:  # a bug, not bad input: answer it, count it, keep serving
            service.metrics.request(self.path.strip("/"), 500, 0.0, None)
            self.log_error("%s failed: %r", self.path, e)
            answer = 500, {"error": f"internal error ({type(e).__name__})"}
        self._json(*answer)

    def _body(self, limit: int) -> bytes | None:
        """The request body, or None after answering 411/413/400 (and closing: the rest is unread)."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            return self._refuse(411, "send the body with a Content-Length (chunked bodies are not read)")
        if not length.strip().isdigit():
            return self._refuse(400, "Content-Length is not a number")
        size = int(length)
        if size > limit:
            return self._refuse(413, f"body of {size:,} bytes is more than the limit of {limit:,}")
        body = self.rfile.read(size)
        if len(body) != size:
            return self._refuse(400, f"body ended after {len(body):,} of {size:,} bytes")
        return body

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        self._json(status, {"error": message})
        return None

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Quiet: a line per request would cost more than the answer; /metrics counts them."""
