"""The HTTP endpoint for probes and Prometheus: /healthz, /readyz, /metrics.

/healthz: every plugin's event loop runs and its device-plugin directory exists (a liveness
probe restarts the pod otherwise, which also re-mounts a directory re-created on the host).
/readyz: every configured resource is served to the kubelet (registered, with the kubelet
holding its ListAndWatch stream, or handed to a newer instance), and the latest configuration
reload was accepted. Both answer 200 "ok" or 503 with one line per problem.

Imported only with --http_port: it brings http.server.
"""

import http.server
import ipaddress
import os
import socket
import threading
from collections.abc import Callable

from absl import logging

from token_resource import metrics
from token_resource.lifecycle import Phase, RunnerStatus

_STARTING = "starting: no resource is served yet"


class StatusServer:
    """Serves the endpoints from a thread until close()."""

    def __init__(
        self,
        address: str,
        port: int,
        statuses: Callable[[], dict[str, RunnerStatus]],
        reload_error: Callable[[], str | None],
        plugin_dirs: Callable[[], set[str]],
    ) -> None:
        status_server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status_server._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                logging.vlog(2, "http: " + format, *args)

        self._statuses = statuses
        self._reload_error = reload_error
        self._plugin_dirs = plugin_dirs
        self._registry = metrics.enable()
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
        # A resource waiting for its socket to be free is a readiness problem: a restart would not
        # cure it. A missing directory is a liveness one: in a pod, only a restart mounts anew.
        problems = [
            f"{name}: {s.problem}" for name, s in sorted(statuses.items()) if s.phase is Phase.STOPPED and s.problem
        ]
        missing = [d for d in sorted(self._plugin_dirs()) if not os.path.isdir(d)]
        problems += [f"the device-plugin directory {d} is missing" for d in missing]
        return problems

    def readiness_problems(self) -> list[str]:
        statuses = self._statuses()
        problems = [
            f"{name}: {s.phase.value}" + (f": {s.problem}" if s.problem else "")
            for name, s in sorted(statuses.items())
            if not s.ready
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
            self._send(request, 200, self._registry.expose(), metrics.CONTENT_TYPE)
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
