"""A fake Kubernetes API server on loopback for the drain's calls: one node and its pods, served
the way kube-apiserver does (paths, merge patches of the node's status, field selectors, watches,
the bearer token, 403s on request), and the kubelet's part of writing allocatable back. Used by
tests/test_drain.py (NodeDrain, the API client) and tests/test_supervisor.py (reloads)."""

import http.server
import json
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from token_resource.kubeapi import JSON

NODE = "node-1"
TOKEN = "example.com/token"
LICENSE = "example.com/license"
# A request the fake server saw: method, path, query, headers, body.
Request = tuple[str, str, dict[str, str], dict[str, str], bytes]
SELECTOR = f"spec.nodeName={NODE},status.phase!=Succeeded,status.phase!=Failed"


def pod(
    name: str,
    resources: dict[str, str] | None = None,
    status: JSON | None = None,
    node: str = NODE,
    deleting: bool = False,
) -> JSON:
    metadata = {"namespace": "default", "name": name}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    limits = {TOKEN: "1"} if resources is None else resources
    return {
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": limits}}]},
        "status": status or {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]},
    }


ADMITTED: JSON = {
    "phase": "Pending",
    "startTime": "2026-01-01T00:00:00Z",
    "conditions": [{"type": "Initialized", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
}


class FakeAPIServer:
    """Serves one node and its pods the way kube-apiserver does for the calls NodeDrain makes."""

    def __init__(self, token: str = "secret") -> None:
        self.token = token
        self.lock = threading.Lock()
        self.version = 1
        self.allocatable = {TOKEN: "2", "cpu": "2"}
        self.pods: list[JSON] = []
        self.requests: list[Request] = []
        self.forbidden: set[tuple[str, str]] = set()  # (method, path) pairs answered 403
        self.watchers: list[queue.Queue[JSON | None]] = []
        self.expire_next_watch = False
        # Each status patch: its allocatable, and what observe() (the test's) said when it came.
        self.patches: list[tuple[dict[str, str], object]] = []
        self.observe: Callable[[], object] = lambda: None
        self.changed = threading.Condition()  # notified after each request and each write
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.handle(self)

            def do_PATCH(self) -> None:
                server.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        with self.lock:
            for watcher in self.watchers:
                watcher.put(None)
        self.httpd.shutdown()
        self.httpd.server_close()

    def node(self) -> JSON:
        return {
            "metadata": {"name": NODE, "resourceVersion": str(self.version)},
            "status": {"capacity": dict(self.allocatable), "allocatable": dict(self.allocatable)},
        }

    def write_allocatable(self, values: Mapping[str, str]) -> None:
        """A status update, as the kubelet's tryUpdateNodeStatus makes it."""
        with self.lock:
            self.allocatable.update(values)
            self.version += 1
            node = self.node()
            for watcher in self.watchers:
                watcher.put({"type": "MODIFIED", "object": node})
        self.notify()

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until predicate() holds (checked after each request and write); TimeoutError if not."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise TimeoutError(f"not within {timeout}s; patches: {self.patches}")

    def watching(self) -> bool:
        with self.lock:
            return bool(self.watchers)

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r[0] == method and r[1] == path]

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        try:
            self.answer(h)
        finally:
            self.notify()

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.requests.append((h.command, url.path, query, dict(h.headers), body))
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.status(h, 401, "Unauthorized", "Unauthorized")
        if (h.command, url.path) in self.forbidden:
            what = "patch resource nodes/status" if h.command == "PATCH" else f"{h.command.lower()} {url.path}"
            return self.status(h, 403, "Forbidden", f'User "system:serviceaccount:x:y" cannot {what}\nat scope')
        if h.command == "PATCH" and url.path == f"/api/v1/nodes/{NODE}/status":
            if h.headers["Content-Type"] != "application/merge-patch+json":
                return self.status(h, 415, "UnsupportedMediaType", h.headers["Content-Type"])
            allocatable = json.loads(body)["status"]["allocatable"]
            self.patches.append((allocatable, self.observe()))
            self.write_allocatable(allocatable)
            return self.send(h, 200, self.node())
        if h.command == "PATCH":
            return self.status(h, 404, "NotFound", f'nodes "{url.path.split("/")[4]}" not found')
        if url.path == "/api/v1/pods":
            assert query["fieldSelector"] == SELECTOR and query["resourceVersion"] == "0"
            return self.send(h, 200, {"kind": "PodList", "items": list(self.pods)})
        if url.path == "/api/v1/nodes" and query.get("watch") == "1":
            assert query["fieldSelector"] == f"metadata.name={NODE}"
            return self.stream(h, query)
        return self.status(h, 404, "NotFound", "the server could not find the requested resource")

    def stream(self, h: http.server.BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        events: queue.Queue[JSON | None] = queue.Queue()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        with self.lock:
            if self.expire_next_watch:
                self.expire_next_watch = False
                status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
                events.put({"type": "ERROR", "object": status})
                events.put(None)
            elif "resourceVersion" not in query:
                events.put({"type": "ADDED", "object": self.node()})
            self.watchers.append(events)
        self.notify()
        end = time.monotonic() + int(query["timeoutSeconds"])
        try:
            while time.monotonic() < end:
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if event is None:
                    break
                data = json.dumps(event).encode() + b"\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away
        finally:
            with self.lock:
                self.watchers.remove(events)
            self.notify()

    def send(self, h: http.server.BaseHTTPRequestHandler, code: int, obj: JSON) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def status(self, h: http.server.BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        self.send(h, code, {"kind": "Status", "status": "Failure", "reason": reason, "message": message, "code": code})
