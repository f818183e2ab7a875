"""NodeDrain and the small API client, against the fake API server on loopback
(tests/fake_apiserver.py), which checks the protocol and plays the kubelet's part of writing
allocatable back; and, opt-in, against a real API server (see test_real_api_server)."""

import contextlib
import json
import os
import pathlib
import threading
import time
from collections.abc import Callable

import pytest

from tests.fake_apiserver import ADMITTED, LICENSE, NODE, SELECTOR, TOKEN, FakeAPIServer, pod
from token_resource import drain, kubeapi
from token_resource.drain import NodeDrain
from token_resource.kubeapi import JSON, KubeAPI, KubeAPIError


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
