"""A tiny Kubernetes API client on the standard library: get, list, patch and watch.

The daemon needs a handful of calls (see drain.py) and must not grow a client library's
footprint for them. In a pod, `in_cluster()` builds the client from the ServiceAccount mount;
tests and tools pass a base URL, a token file and a CA file (or insecure) instead.

Every failure, from a refused connection to a 403, is a `KubeAPIError` with a one-line message
(method, path, status code, the API's reason and message), so callers can log it as it is.
"""

import contextlib
import dataclasses
import http.client
import json
import os
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
REQUEST_TIMEOUT_S = 10.0
# An API message can quote a whole object; a log line needs its start only.
_MESSAGE_CHARS = 300

JSON = dict[str, Any]


class KubeAPIError(Exception):
    """A request failed; str() is one line. status is the HTTP code (None: no answer), reason
    the API's Status reason (Forbidden, NotFound, Expired, ...) or the transport error."""

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: JSON


class KubeAPI:
    """One connection per request: calls are rare, and a fresh connection never finds itself
    half-closed by an idle timeout on the server or a proxy."""

    def __init__(
        self,
        base_url: str,
        token_file: str | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._https = url.scheme == "https"
        self._host = url.hostname  # without the brackets of an IPv6 literal; http.client adds them
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._token_file = token_file
        self._timeout_s = timeout_s
        self._ca_file = ca_file
        self._insecure = insecure
        self._context: ssl.SSLContext | None = None  # made at the first request, see _tls

    def get(self, path: str, params: Mapping[str, str] | None = None, timeout_s: float | None = None) -> JSON:
        return self._request("GET", path, params, timeout_s=timeout_s)

    def list(
        self,
        path: str,
        field_selector: str | None = None,
        timeout_s: float | None = None,
        resource_version: str | None = None,
    ) -> list[JSON]:
        """The items of a collection, e.g. list("/api/v1/pods", "spec.nodeName=n1"). With
        resource_version "0" the API server answers from its watch cache instead of etcd."""
        params = {"fieldSelector": field_selector} if field_selector else {}
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        return list(self._request("GET", path, params, timeout_s=timeout_s).get("items") or [])

    def patch(
        self, path: str, body: Mapping[str, Any], content_type: str = MERGE_PATCH, timeout_s: float | None = None
    ) -> JSON:
        return self._request("PATCH", path, None, body, content_type, timeout_s)

    def patch_node_status(
        self, node: str, body: Mapping[str, Any], strategic: bool = False, timeout_s: float | None = None
    ) -> JSON:
        """Patches the status subresource: body is {"status": {...}}. Returns the node."""
        path = f"/api/v1/nodes/{urllib.parse.quote(node, safe='')}/status"
        return self.patch(path, body, STRATEGIC_MERGE_PATCH if strategic else MERGE_PATCH, timeout_s)

    def watch(
        self,
        path: str,
        field_selector: str | None = None,
        resource_version: str | None = None,
        timeout_s: float = 60.0,
    ) -> "Watch":
        """Starts a watch of a collection; the server ends it after about timeout_s. Without a
        resource_version it begins with an ADDED event for each object that exists."""
        params = {"watch": "1", "timeoutSeconds": str(max(1, int(timeout_s))), "allowWatchBookmarks": "true"}
        if field_selector:
            params["fieldSelector"] = field_selector
        if resource_version:
            params["resourceVersion"] = resource_version
        # The socket timeout is a backstop for a server gone silent; it ends its watch itself.
        connection, response = self._send("GET", path, params, None, None, timeout_s + 10.0)
        return Watch(connection, response, path)

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        timeout_s: float | None = None,
    ) -> JSON:
        connection, response = self._send(method, path, params, body, content_type, timeout_s)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise KubeAPIError(f"{method} {path}: {_describe(error)}", reason=type(error).__name__) from None
        finally:
            connection.close()
        try:
            answer = json.loads(data)
        except ValueError:
            raise KubeAPIError(f"{method} {path}: the answer is not JSON", response.status) from None
        if not isinstance(answer, dict):
            raise KubeAPIError(f"{method} {path}: the answer is not a JSON object", response.status)
        return answer

    def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        content_type: str | None,
        timeout_s: float | None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Sends a request and returns the open response, or raises KubeAPIError for anything
        but a 2xx (the connection is then closed)."""
        target = self._prefix + path + ("?" + urllib.parse.urlencode(params) if params else "")
        timeout = self._timeout_s if timeout_s is None else timeout_s
        connection: http.client.HTTPConnection
        headers = {"Accept": "application/json", "User-Agent": "token-resource"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        try:
            if self._https:
                connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls())
            else:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        except OSError as error:  # ssl.SSLError included
            raise KubeAPIError(
                f"{method} {self.base_url}{path}: CA file {self._ca_file}: {_describe(error)}",
                reason=type(error).__name__,
            ) from None
        try:
            headers.update(self._auth())
            connection.request(method, target, payload, headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise KubeAPIError(
                f"{method} {self.base_url}{path}: {_describe(error)}", reason=type(error).__name__
            ) from None
        if response.status // 100 != 2:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException):
                data = b""
            connection.close()
            reason, message = _status_of(data, response.reason)
            raise KubeAPIError(f"{method} {path}: {response.status} {reason}: {message}", response.status, reason)
        return connection, response

    def _tls(self) -> ssl.SSLContext:
        # Made on first use, so that a missing or bad CA file is a KubeAPIError of the request
        # (logged by the caller) rather than an exception where the client is built.
        if self._context is None:
            if self._insecure:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context(cafile=self._ca_file)
            self._context = context
        return self._context

    def _auth(self) -> dict[str, str]:
        # Re-read each time: bound ServiceAccount tokens are rotated in place by the kubelet.
        if self._token_file is None:
            return {}
        with open(self._token_file) as f:
            token = f.read().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}


class Watch:
    """Iterates over a watch's events until the server ends it or close() is called (from
    any thread). An ERROR event is raised as KubeAPIError (410 Expired: watch again without a
    resource version)."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, path: str) -> None:
        self._connection = connection
        self._response = response
        self._path = path
        self._lock = threading.Lock()
        self._closed = False
        self._reading = False

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            reading = self._reading
        sock = self._connection.sock
        if sock is not None:
            # Wakes a reader blocked in another thread, which then closes the connection itself:
            # closing it here would pull the response out from under it. The plain socket method,
            # as the TLS wrapper's would drop its state while the reader still uses it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if not reading:
            self._connection.close()

    def __iter__(self) -> Iterator[WatchEvent]:
        with self._lock:
            if self._closed or self._reading:
                return
            self._reading = True
        try:
            while True:
                try:
                    line = self._response.readline()
                except (OSError, ValueError, http.client.HTTPException) as error:
                    if self._closed:
                        return
                    raise KubeAPIError(f"watch {self._path}: {_describe(error)}", reason=type(error).__name__) from None
                if self._closed or not line:
                    return  # closed, or the server ended the watch (timeoutSeconds)
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                except (ValueError, KeyError, TypeError):
                    raise KubeAPIError(f"watch {self._path}: not a watch event: {line[:80]!r}") from None
                if kind == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    reason, message = _status_of(json.dumps(obj).encode(), "")
                    raise KubeAPIError(f"watch {self._path}: {code} {reason}: {message}", code, reason)
                yield WatchEvent(kind, obj)
        finally:
            self._connection.close()


def in_cluster(timeout_s: float = REQUEST_TIMEOUT_S) -> KubeAPI | None:
    """The client for the API server of the pod this runs in; None outside a pod or without a
    mounted ServiceAccount token (automountServiceAccountToken: false)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token_file = os.path.join(SERVICE_ACCOUNT_DIR, "token")
    if not host or not os.path.isfile(token_file):
        return None
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return KubeAPI(
        f"https://{host}:{port}", token_file, os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"), timeout_s=timeout_s
    )


def _status_of(data: bytes, fallback: str) -> tuple[str, str]:
    """The reason and the first line of the message of an API Status object."""
    try:
        status = json.loads(data)
    except ValueError:
        status = None
    if not isinstance(status, dict):
        text = data.decode(errors="replace").strip()
        return fallback or "error", _one_line(text) or "(no message)"
    return str(status.get("reason") or fallback or "error"), _one_line(str(status.get("message") or "(no message)"))


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MESSAGE_CHARS else line[: _MESSAGE_CHARS - 1] + "…"


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: {error.verify_message}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error) or type(error).__name__
