"""NodeDrain and the small API client, against a fake API server on loopback that checks the
protocol (paths, patch bodies, field selectors, the bearer token) and plays the kubelet's part of
writing allocatable back; the supervisor withholding a lower count through NodeDrain, with real
plugin runners and a fake kubelet; and, opt-in, against a real API server (see
test_real_api_server)."""

import contextlib
import http.server
import json
import os
import pathlib
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import pytest

from tests.fake_kubelet import FakeKubelet, advertising
from token_resource import config, drain, kubeapi
from token_resource.config import PluginConfig
from token_resource.drain import NodeDrain
from token_resource.kubeapi import JSON, KubeAPI, KubeAPIError
from token_resource.policy import DevicePolicy
from token_resource.supervisor import ConfigFile, Supervisor
from token_resource.tokens import TokenPolicy

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


@pytest.fixture
def server() -> Iterator[FakeAPIServer]:
    fake = FakeAPIServer()
    yield fake
    fake.close()


@pytest.fixture
def api(server: FakeAPIServer, tmp_path: pathlib.Path) -> KubeAPI:
    token = tmp_path / "token"
    token.write_text(server.token + "\n")
    return KubeAPI(server.url, str(token))


def later(seconds: float, action: Callable[[], object]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


def test_patches_allocatable_to_zero_and_returns_when_no_pod_waits(server: FakeAPIServer, api: KubeAPI) -> None:
    server.pods = [pod("admitted", status=ADMITTED), pod("no-token", resources={"cpu": "1"})]
    result = NodeDrain(api, NODE, settle_s=0.2).withhold({TOKEN: 0}, timeout_s=5)
    assert result.patched and result.skipped is None
    assert result.pods == () and result.unadmitted == ()
    assert 0.2 <= result.seconds < 1.5
    [patch] = server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")
    assert json.loads(patch[4]) == {"status": {"allocatable": {TOKEN: "0"}}}
    assert patch[3]["Content-Type"] == "application/merge-patch+json"
    assert server.allocatable == {TOKEN: "0", "cpu": "2"}  # only the withheld resource
    assert all(r[3]["Authorization"] == "Bearer secret" for r in server.requests)
    assert server.calls("GET", "/api/v1/pods")  # with the field selector the server asserts


def test_waits_until_bound_pods_are_admitted(server: FakeAPIServer, api: KubeAPI) -> None:
    server.pods = [
        pod("waiting"),
        pod("deleted-before-admission", deleting=True),
        pod("other-resource", resources={"example.com/other": "1"}),
    ]

    def admit() -> None:
        server.pods = [pod("waiting", status=ADMITTED)]

    later(0.6, admit)
    result = NodeDrain(api, NODE, settle_s=0.1).withhold({TOKEN: 0}, timeout_s=5)
    assert result.patched and result.pods == ("default/waiting",) and result.unadmitted == ()
    assert 0.6 <= result.seconds < 2


def test_returns_at_the_timeout_with_the_pods_still_waiting(server: FakeAPIServer, api: KubeAPI) -> None:
    server.pods = [pod("never-admitted")]
    start = time.monotonic()
    result = NodeDrain(api, NODE, settle_s=0.1).withhold({TOKEN: 0}, timeout_s=1.0)
    took = time.monotonic() - start
    assert 1.0 <= took < 1.6
    assert result.patched and result.unadmitted == ("default/never-admitted",)


def test_withholds_again_when_the_kubelet_writes_the_count_back_and_stops_after(
    server: FakeAPIServer, api: KubeAPI
) -> None:
    server.pods = [pod("waiting")]
    later(0.4, lambda: server.write_allocatable({TOKEN: "2"}))

    def admit() -> None:
        server.pods = [pod("waiting", status=ADMITTED)]

    later(1.2, admit)
    result = NodeDrain(api, NODE, settle_s=0.1).withhold({TOKEN: 0}, timeout_s=5)
    assert result.repatches == 1
    assert len(server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")) == 2
    assert server.allocatable[TOKEN] == "0"
    [watch, *_] = server.calls("GET", "/api/v1/nodes")
    assert watch[2]["resourceVersion"] == "2"  # from the patch's answer: no write missed in between
    # The next plugin instance registers and the kubelet writes the count: left alone.
    server.write_allocatable({TOKEN: "2"})
    time.sleep(0.5)
    assert len(server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")) == 2
    assert server.allocatable[TOKEN] == "2"


def test_withholds_down_to_a_quantity_and_withholds_again_only_what_comes_back_above_it(
    server: FakeAPIServer, api: KubeAPI
) -> None:
    server.allocatable = {TOKEN: "4", LICENSE: "3"}
    server.pods = [pod("waiting")]
    results: list[drain.DrainResult] = []
    withholding = threading.Thread(
        target=lambda: results.append(NodeDrain(api, NODE, settle_s=0.1).withhold({TOKEN: 2, LICENSE: 0}, timeout_s=10))
    )
    withholding.start()
    server.wait_for(lambda: bool(server.patches) and server.watching())
    assert server.patches[0][0] == {TOKEN: "2", LICENSE: "0"}
    assert server.allocatable == {TOKEN: "2", LICENSE: "0"}
    server.write_allocatable({TOKEN: "4"})  # the kubelet's status update, from its view of 4 devices
    server.wait_for(lambda: len(server.patches) == 2)
    assert server.patches[1][0] == {TOKEN: "2"} and server.allocatable[TOKEN] == "2"
    # The kubelet's own view fell below the quantity (devices gone): its to say. The license,
    # written back, is withheld again on its own.
    server.write_allocatable({TOKEN: "1", LICENSE: "3"})
    server.wait_for(lambda: len(server.patches) == 3)
    assert server.patches[2][0] == {LICENSE: "0"}
    assert server.allocatable == {TOKEN: "1", LICENSE: "0"}
    server.write_allocatable({TOKEN: "2"})  # agrees with the quantity: nothing to do
    server.pods = [pod("waiting", status=ADMITTED)]
    withholding.join(timeout=5)
    [result] = results
    assert result.patched and result.skipped is None and result.pods == ("default/waiting",)
    assert result.repatches == 2 and len(server.patches) == 3
    assert NodeDrain(api, NODE).seal({TOKEN: 2})
    assert server.patches[3][0] == {TOKEN: "2"}


def test_seal_patches_once_more_and_never_raises(server: FakeAPIServer, api: KubeAPI, tmp_path: pathlib.Path) -> None:
    nodes = NodeDrain(api, NODE, settle_s=0.1)
    nodes.withhold({TOKEN: 0}, timeout_s=1)
    server.write_allocatable({TOKEN: "2"})  # just before the stream ended
    assert nodes.seal({TOKEN: 0})
    assert server.allocatable[TOKEN] == "0"
    assert len(server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")) == 2
    server.forbidden.add(("PATCH", f"/api/v1/nodes/{NODE}/status"))
    assert not nodes.seal({TOKEN: 0})
    (tmp_path / "token").unlink()
    assert not nodes.seal({TOKEN: 0})


def test_watches_again_from_the_current_state_when_the_version_expired(server: FakeAPIServer, api: KubeAPI) -> None:
    server.expire_next_watch = True
    server.pods = [pod("waiting")]
    later(0.5, lambda: server.write_allocatable({TOKEN: "2"}))
    later(1.2, lambda: setattr(server, "pods", []))
    result = NodeDrain(api, NODE, settle_s=0.1).withhold({TOKEN: 0}, timeout_s=5)
    watches = server.calls("GET", "/api/v1/nodes")
    assert "resourceVersion" in watches[0][2] and "resourceVersion" not in watches[1][2]
    assert result.repatches == 1 and server.allocatable[TOKEN] == "0"


def test_forbidden_patch_is_skipped_with_the_missing_permission(server: FakeAPIServer, api: KubeAPI) -> None:
    server.forbidden.add(("PATCH", f"/api/v1/nodes/{NODE}/status"))
    result = NodeDrain(api, NODE).withhold({TOKEN: 0}, timeout_s=5)
    assert not result.patched and result.skipped is not None
    assert "403 Forbidden" in result.skipped and "RBAC patch on nodes/status" in result.skipped
    assert "\n" not in result.skipped
    assert server.allocatable[TOKEN] == "2"
    assert not server.calls("GET", "/api/v1/pods")


def test_forbidden_pod_list_waits_the_settle_time_only(server: FakeAPIServer, api: KubeAPI) -> None:
    server.forbidden.add(("GET", "/api/v1/pods"))
    result = NodeDrain(api, NODE, settle_s=0.5).withhold({TOKEN: 0}, timeout_s=5)
    assert result.skipped is not None
    assert result.patched and "RBAC list on pods" in result.skipped
    assert 0.5 <= result.seconds < 1.5


def test_forbidden_watch_falls_back_to_patching_every_second(server: FakeAPIServer, api: KubeAPI) -> None:
    server.forbidden.add(("GET", "/api/v1/nodes"))
    server.pods = [pod("waiting")]
    later(0.3, lambda: server.write_allocatable({TOKEN: "2"}))
    later(1.5, lambda: setattr(server, "pods", []))
    result = NodeDrain(api, NODE, settle_s=0.1).withhold({TOKEN: 0}, timeout_s=5)
    assert result.skipped is not None
    assert result.patched and "RBAC watch on nodes" in result.skipped
    assert len(server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")) >= 2
    assert server.allocatable[TOKEN] == "0"


def test_unreachable_api_server_is_skipped(tmp_path: pathlib.Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    with contextlib.closing(FakeAPIServer()) as gone:
        url = gone.url
    result = NodeDrain(KubeAPI(url, str(token)), NODE).withhold({TOKEN: 0}, timeout_s=2)
    assert result.skipped is not None
    assert not result.patched and "API server unreachable" in result.skipped


def test_unknown_node_is_skipped(server: FakeAPIServer, api: KubeAPI) -> None:
    result = NodeDrain(api, "no-such-node").withhold({TOKEN: 0}, timeout_s=2)
    assert result.skipped is not None
    assert not result.patched and result.skipped.startswith("PATCH /api/v1/nodes/no-such-node/status: 404 NotFound")


def test_the_token_is_read_again_for_each_request(server: FakeAPIServer, api: KubeAPI, tmp_path: pathlib.Path) -> None:
    api.get("/api/v1/pods", {"fieldSelector": SELECTOR, "resourceVersion": "0"})
    (tmp_path / "token").write_text("rotated")
    with pytest.raises(KubeAPIError) as error:
        api.get("/api/v1/pods", {"fieldSelector": SELECTOR, "resourceVersion": "0"})
    assert error.value.status == 401 and str(error.value) == "GET /api/v1/pods: 401 Unauthorized: Unauthorized"
    server.token = "rotated"
    assert api.list("/api/v1/pods", SELECTOR, resource_version="0") == []


def test_a_bad_ca_file_is_an_error_of_the_request(tmp_path: pathlib.Path) -> None:
    api = KubeAPI("https://127.0.0.1:1", None, str(tmp_path / "ca.crt"))  # builds without reading it
    with pytest.raises(KubeAPIError, match=r"^GET https://127.0.0.1:1/api: CA file .*ca.crt: No such file"):
        api.get("/api")


def test_a_watch_can_be_closed_from_another_thread(server: FakeAPIServer, api: KubeAPI) -> None:
    watch = api.watch("/api/v1/nodes", f"metadata.name={NODE}", timeout_s=30)
    events: list[kubeapi.WatchEvent] = []
    reader = threading.Thread(target=lambda: events.extend(watch))
    reader.start()
    time.sleep(0.3)
    start = time.monotonic()
    watch.close()
    reader.join(timeout=2)
    assert not reader.is_alive() and time.monotonic() - start < 1
    assert [e.type for e in events] == ["ADDED"]


def test_in_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setattr(kubeapi, "SERVICE_ACCOUNT_DIR", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert kubeapi.in_cluster() is None  # no token mounted
    (tmp_path / "token").write_text("t")
    monkeypatch.setattr(kubeapi.ssl, "create_default_context", lambda cafile=None: cafile)
    api = kubeapi.in_cluster()
    assert api is not None and api.base_url == "https://[fd00::1]:6443"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert kubeapi.in_cluster() is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"phase": "Pending"}, False),
        ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}, False),
        (ADMITTED, True),
        ({"phase": "Pending", "startTime": "2026-01-01T00:00:00Z"}, True),
        ({"phase": "Running"}, True),
        ({"phase": "Failed", "reason": "UnexpectedAdmissionError"}, True),
    ],
)
def test_admitted(status: JSON, expected: bool) -> None:
    assert drain.admitted({"status": status}) is expected


def test_requests_any() -> None:
    assert drain.requests_any(pod("a"), {TOKEN})
    assert not drain.requests_any(pod("a", resources={TOKEN: "0"}), {TOKEN})
    init = {"spec": {"containers": [{}], "initContainers": [{"resources": {"requests": {TOKEN: "1"}}}]}}
    assert drain.requests_any(init, {TOKEN})


# The supervisor: a reload that lowers a count --------------------------------------------------


def token_policy(plugin: PluginConfig, previous: DevicePolicy | None) -> DevicePolicy:
    """As the daemon's (main.token_policy)."""
    if isinstance(previous, TokenPolicy):
        return previous.reconfigured(plugin.count)
    return TokenPolicy(plugin.resource, plugin.count)


class Reloads:
    """A Supervisor of the resources in a config file, with the real NodeDrain as its withholder,
    running on a thread against the fake kubelet; write() changes the file, which it reloads."""

    def __init__(self, kubelet: FakeKubelet, api: KubeAPI, text: str, registry_dir: str = "") -> None:
        directory = os.path.join(kubelet.directory, "config")
        os.mkdir(directory)
        self.path = os.path.join(directory, "config.yaml")
        pathlib.Path(self.path).write_text(text)
        source = ConfigFile(self.path, config.Placement(kubelet.directory, registry_dir or kubelet.directory), NODE)
        _, plugins = source.load()
        self.supervisor = Supervisor(
            plugins,
            token_policy,
            instance=time.time_ns(),
            source=source,
            source_text=text,
            withholder=NodeDrain(api, NODE, settle_s=0.1, timeout_s=5),
        )
        self.thread = threading.Thread(target=self.supervisor.run)
        self.thread.start()

    def write(self, text: str) -> None:
        tmp = self.path + ".tmp"
        pathlib.Path(tmp).write_text(text)
        os.rename(tmp, self.path)  # MOVED_TO: one reload, of the whole file

    def wait_held(self, *names: str, timeout: float = 10.0) -> None:
        """Until the runners of `names` are REGISTERED: the kubelet may read a snapshot before
        the runner has taken in that its stream opened, and only what is held is withheld."""
        deadline = time.monotonic() + timeout
        while not all(self.supervisor.statuses()[name].registered for name in names):
            assert time.monotonic() < deadline, self.supervisor.statuses()
            time.sleep(0.01)

    def published(self, resource: str) -> int:
        """How many devices the resource's runner serves now (not what the kubelet has read yet)."""
        running = self.supervisor._running.get(resource)
        return -1 if running is None else len(running.runner.policy.devices().devices)

    def stop(self) -> None:
        self.supervisor.stop()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


def resources(*entries: tuple[str, int], extra: str = "") -> str:
    return "resources:\n" + "".join(f"  - name: {name}\n    count: {count}\n" for name, count in entries) + extra


def test_a_lower_count_is_withheld_until_bound_pods_are_admitted_then_published_then_sealed(
    server: FakeAPIServer, api: KubeAPI, kubelet: FakeKubelet
) -> None:
    server.allocatable = {TOKEN: "3"}
    reloads = Reloads(kubelet, api, resources((TOKEN, 3)))
    try:
        kubelet.wait_until(advertising(TOKEN, 3))
        reloads.wait_held(TOKEN)
        server.observe = lambda: (kubelet.allocatable(TOKEN), reloads.published(TOKEN))
        server.pods = [pod("bound", resources={TOKEN: "3"})]  # bound by the scheduler, not admitted yet
        reloads.write(resources((TOKEN, 1)))
        server.wait_for(lambda: bool(server.patches) and server.watching())
        # The scheduler's view first, while the kubelet still has 3 devices for the bound pod.
        assert server.patches[0] == ({TOKEN: "1"}, (3, 3))
        server.write_allocatable({TOKEN: "3"})  # the kubelet's status update from its view
        server.wait_for(lambda: len(server.patches) == 2)
        assert server.patches[1] == ({TOKEN: "1"}, (3, 3)) and server.allocatable[TOKEN] == "1"
        # The bound pod gets 3 tokens from the snapshot still published: after the decrease,
        # the kubelet would refuse it (UnexpectedAdmissionError).
        assert kubelet.admit("bound", "c", TOKEN, 3).ids == ("item-0", "item-1", "item-2")
        server.pods = [pod("bound", resources={TOKEN: "3"}, status=ADMITTED)]
        kubelet.wait_until(advertising(TOKEN, 1))
        server.wait_for(lambda: len(server.patches) == 3)
        # Sealed once the runner serves the lower count, so a write-back of 3 between the end
        # of the withholding and the new snapshot does not stand.
        sealed, (_, published) = cast(tuple[dict[str, str], tuple[int, int]], server.patches[2])
        assert sealed == {TOKEN: "1"} and published == 1
        assert len(kubelet.register_requests) == 1  # the same stream throughout
        # An increase needs none of it: the scheduler's view can only be behind on the safe side.
        reloads.write(resources((TOKEN, 4)))
        kubelet.wait_until(advertising(TOKEN, 4))
        assert len(server.patches) == 3
    finally:
        reloads.stop()
    # The stop is the same with quantity 0, while the stream is still open.
    assert [p[0] for p in server.patches[3:]] == [{TOKEN: "0"}, {TOKEN: "0"}]
    assert server.patches[3][1] == (4, 4)


def test_a_removed_resource_is_withheld_as_a_stop_and_one_not_held_is_left_alone(
    server: FakeAPIServer, api: KubeAPI, kubelet: FakeKubelet, registry: str
) -> None:
    # The license registers through a plugin watcher that no kubelet runs: never held.
    watched = "    registration: plugin_watcher\n    socket: license.sock\n"
    reloads = Reloads(kubelet, api, resources((TOKEN, 2), (LICENSE, 2), extra=watched), registry_dir=registry)
    try:
        kubelet.wait_until(advertising(TOKEN, 2))
        reloads.wait_held(TOKEN)
        server.observe = lambda: kubelet.resources[TOKEN].connected
        reloads.write(resources((LICENSE, 1), extra=watched))
        kubelet.wait_until(lambda k: not k.resources[TOKEN].connected)
        server.wait_for(lambda: len(server.patches) == 2)
        assert server.patches == [({TOKEN: "0"}, True), ({TOKEN: "0"}, server.patches[1][1])]
        assert reloads.published(LICENSE) == 1
    finally:
        reloads.stop()
    assert len(server.patches) == 2  # and not at the stop: the license was never held


def test_without_api_access_a_lower_count_applies_as_before(
    server: FakeAPIServer, api: KubeAPI, kubelet: FakeKubelet
) -> None:
    server.forbidden.add(("PATCH", f"/api/v1/nodes/{NODE}/status"))
    reloads = Reloads(kubelet, api, resources((TOKEN, 3)))
    try:
        kubelet.wait_until(advertising(TOKEN, 3))
        reloads.wait_held(TOKEN)
        reloads.write(resources((TOKEN, 1)))
        kubelet.wait_until(advertising(TOKEN, 1))
        assert len(server.calls("PATCH", f"/api/v1/nodes/{NODE}/status")) == 1  # tried once: 403
        assert not server.calls("GET", "/api/v1/pods") and not server.patches
    finally:
        reloads.stop()


# Opt-in, against a real API server: TR_KUBE_API=https://127.0.0.1:16443, TR_KUBE_TOKEN_FILE (a
# file holding a bearer token), TR_KUBE_NODE, and TR_KUBE_RESOURCE, a resource a device plugin
# has registered on that node (its allocatable nonzero). TLS is not verified.
REAL = {name: os.environ.get(f"TR_KUBE_{name}") for name in ("API", "TOKEN_FILE", "NODE", "RESOURCE")}


@pytest.mark.skipif(
    not all(REAL.values()), reason="set TR_KUBE_API, TR_KUBE_TOKEN_FILE, TR_KUBE_NODE, TR_KUBE_RESOURCE"
)
@pytest.mark.parametrize("lower_by", [None, 1], ids=["to-zero", "one-less"])
def test_real_api_server(lower_by: int | None) -> None:
    url, token_file, node, resource = (REAL[name] or "" for name in ("API", "TOKEN_FILE", "NODE", "RESOURCE"))
    api = KubeAPI(url, token_file, insecure=True)
    path = f"/api/v1/nodes/{node}"

    def allocatable() -> str | None:
        return api.get(path)["status"]["allocatable"].get(resource)

    count = allocatable()
    assert count not in (None, "0"), f"{resource} is not registered on {node}"
    quantity = 0 if lower_by is None else int(count or 0) - lower_by
    # Held past the kubelet's 10 s status update, which writes the count back at least once.
    result = NodeDrain(api, node, settle_s=12).withhold({resource: quantity}, timeout_s=15)
    assert result.patched and result.skipped is None and result.repatches >= 1
    assert allocatable() == str(quantity)
    # Left alone after, the kubelet's next update restores its own view.
    deadline = time.monotonic() + 15
    while allocatable() == str(quantity) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert allocatable() == count
