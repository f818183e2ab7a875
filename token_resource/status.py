"""The HTTP endpoint for probes and Prometheus: /healthz, /readyz, /metrics.

/healthz: every plugin's thread and gRPC server are up (a liveness probe restarts the pod
otherwise). /readyz: every configured resource is registered and the kubelet holds its
ListAndWatch stream, and the latest configuration reload was accepted. Both answer 200 "ok"
or 503 with one line per problem.
"""

import http.server
import ipaddress
import socket
import threading
from collections.abc import Callable

import prometheus_client
from absl import logging

from token_resource import metrics
from token_resource.lifecycle import RunnerStatus

_STARTING = "starting: no resource is served yet"


class StatusServer:
    """Serves the endpoints from a thread until close()."""

    def __init__(
        self,
        address: str,
        port: int,
        statuses: Callable[[], dict[str, RunnerStatus]],
        reload_error: Callable[[], str | None],
    ) -> None:
        status_server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status_server._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                logging.vlog(2, "http: " + format, *args)

        self._statuses = statuses
        self._reload_error = reload_error
        self._httpd = _server_for(address)((address, port), Handler)
        self._httpd.daemon_threads = True
        self.address = self._httpd.server_address
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        logging.info("serving /healthz, /readyz and /metrics on http://%s:%d", *self.address[:2])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def health_problems(self) -> list[str]:
        statuses = self._statuses()
        if not statuses:
            return [_STARTING]
        # A plugin that gave up (its socket is taken, say) is a readiness problem: restarting
        # the process would not cure it.
        return [f"{name}: not serving" for name, s in sorted(statuses.items()) if not s.serving and s.error is None]

    def readiness_problems(self) -> list[str]:
        statuses = self._statuses()
        problems = [
            f"{name}: cannot serve: {s.error}" if s.error else f"{name}: not registered with the kubelet"
            for name, s in sorted(statuses.items())
            if not s.registered
        ]
        if not statuses:
            problems.append(_STARTING)
        error = self._reload_error()
        if error is not None:
            problems.append(f"configuration reload rejected: {error}")
        return problems

    def _answer(self, request: http.server.BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            for name, status in self._statuses().items():
                metrics.REGISTERED.labels(name).set(int(status.registered))
            body = prometheus_client.generate_latest(metrics.REGISTRY)
            self._send(request, 200, body, prometheus_client.CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            problems = self.health_problems() if path == "/healthz" else self.readiness_problems()
            text = "\n".join(problems) if problems else "ok"
            self._send(request, 503 if problems else 200, (text + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._send(request, 404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain; charset=utf-8")

    @staticmethod
    def _send(request: http.server.BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
        request.send_response(code)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def _server_for(address: str) -> type[http.server.ThreadingHTTPServer]:
    """The HTTP server class for an IPv4 or IPv6 address ($POD_IP may be either)."""
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:  # a host name: IPv4, as http.server does
        version = 4
    if version == 4:
        return http.server.ThreadingHTTPServer

    class IPv6Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    return IPv6Server
