"""The HTTP endpoints, served off the event loop: /metrics, /healthz, /readyz.

The server (prometheus-client's WSGI app, `wsgiref`) runs in its own thread,
so a slow or hung scraper never touches ingestion. It reads the components'
integers and flags, which is safe from another thread.

- `/metrics`: Prometheus text format.
- `/healthz`: 200 while the event loop is turning (it ticks every second);
  503 once it has not for `LOOP_STALL` seconds: the process is wedged.
- `/readyz`: 200 when connected to the broker, the store takes writes and the
  pipeline is not stalled; 503 otherwise. The body (JSON) names each check.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

if TYPE_CHECKING:
    from ingestd.observe.metrics import Metrics

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the log


class MetricsServer:
    """The HTTP endpoint, in a thread of its own."""

    def __init__(self, host: str, port: int, metrics: Metrics) -> None:
        self.metrics = metrics
        self._prometheus = make_wsgi_app(metrics.registry)
        self._server = make_server(host, port, self._app, _Server, _QuietHandler)
        address = self._server.server_address
        self.host, self.port = str(address[0]), int(address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="metrics-http",
            daemon=True,
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving. The thread notices a shutdown at its next wake-up: its
        poll (0.5 s, most of an idle daemon's stop, measured 0.55 s) or a
        connection, so one is made until it has (an idle stop then takes ~0.1 s;
        a poll of 0.1 s instead would wake an idle daemon 10 times a second)."""
        stopping = threading.Thread(target=self._server.shutdown, name="metrics-stop")
        stopping.start()
        while stopping.is_alive():
            self._wake()
            stopping.join(0.05)
        self._server.server_close()
        self._thread.join(5)

    def _wake(self) -> None:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        with suppress(OSError), socket.create_connection((host, self.port), timeout=0.2):
            pass

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        health = self.metrics.health
        if path == "/metrics":
            return self._prometheus(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            live = health.live()
            return _json(
                start_response,
                200 if live else 503,
                {"live": live, "loop_tick_age_s": round(time.monotonic() - health.tick_at, 3)},
            )
        if path == "/readyz":
            ready, checks = health.readiness()
            return _json(start_response, 200 if ready else 503, {"ready": ready, **checks})
        if path == "/":
            body = b"ingestd: /metrics /healthz /readyz\n"
            start_response(
                "200 OK",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return _json(start_response, 404, {"error": f"no such path: {path}"})


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    start_response(
        f"{status} {reason}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]
