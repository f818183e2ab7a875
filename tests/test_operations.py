"""Several resources, per-node counts, live reconfiguration, and the HTTP endpoint, with the
real daemon against fake kubelets."""

import os
import re
import signal
import socket
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.conftest import StartDaemon
from tests.daemon import Daemon, free_port, http_get, removed_from, run_to_exit, wait_for_http
from tests.fake_kubelet import AdmissionError, FakeKubelet, Mode, advertising
from token_resource.backoff import BACKOFF_CAP_S

TOKEN = "example.com/token"
LICENSE = "example.com/license"


def config_text(*resources: tuple[str, int], extra: str = "", sockets: dict[str, str] | None = None) -> str:
    lines = ["resources:"]
    for name, count in resources:
        lines += [f"  - name: {name}", f"    count: {count}"]
        if sockets and name in sockets:
            lines.append(f"    socket: {sockets[name]}")
    return "\n".join(lines) + "\n" + extra


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def ids(kubelet: FakeKubelet, resource: str) -> list[str]:
    return [d.ID for d in kubelet.resources[resource].snapshots[-1].devices]


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    status, text = http_get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def config_path(plugin_dir: str) -> str:
    directory = os.path.join(plugin_dir, "config")
    os.mkdir(directory)
    return os.path.join(directory, "config.yaml")


def start(daemons: StartDaemon, kubelet: FakeKubelet, config_path: str, *extra: str) -> Daemon:
    return daemons(f"--plugin_dir={kubelet.directory}", f"--config={config_path}", *extra)


def test_two_resources_from_one_config_each_with_its_own_socket(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str
) -> None:
    write(config_path, config_text((TOKEN, 2), (LICENSE, 3)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(lambda k: advertising(TOKEN, 2)(k) and advertising(LICENSE, 3)(k))
    endpoints = {r.resource_name: r.endpoint for r in kubelet.register_requests}
    # No socket: key: each process serves on token-resource-<resource>.<instance>.sock, one instance for all.
    token = re.fullmatch(r"token-resource-example\.com_token\.([0-9]+)\.sock", endpoints[TOKEN])
    license_ = re.fullmatch(r"token-resource-example\.com_license\.([0-9]+)\.sock", endpoints[LICENSE])
    assert token and license_ and token.group(1) == license_.group(1), endpoints
    assert sorted(os.listdir(kubelet.directory)) == sorted(["config", "kubelet.sock", *endpoints.values()])
    assert ids(kubelet, LICENSE) == ["item-0", "item-1", "item-2"]
    assert dict(kubelet.admit("pod", "c", LICENSE, 1).response.envs) == {"EXAMPLE_COM_LICENSE": "item-0"}


@pytest.mark.parametrize("node,count", [("worker-1", 5), ("worker-2", 2)])
def test_per_node_count_applies_to_the_named_node_only(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str, node: str, count: int
) -> None:
    write(config_path, config_text((TOKEN, 2)) + "    nodes: {worker-1: 5}\n")
    start(daemons, kubelet, config_path, f"--node_name={node}")
    kubelet.wait_until(advertising(TOKEN, count))


def test_node_name_comes_from_the_environment(kubelet: FakeKubelet, config_path: str, plugin_dir: str) -> None:
    write(config_path, config_text((TOKEN, 2)) + "    nodes: {worker-1: 4}\n")
    os.environ["NODE_NAME"] = "worker-1"
    try:
        daemon = Daemon(f"--plugin_dir={plugin_dir}", f"--config={config_path}")
    finally:
        del os.environ["NODE_NAME"]
    try:
        kubelet.wait_until(advertising(TOKEN, 4))
    finally:
        daemon.terminate()
        daemon.close()


def test_an_edited_file_sends_a_new_snapshot_keeping_ids(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str
) -> None:
    write(config_path, config_text((TOKEN, 2)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(advertising(TOKEN, 2))
    write(config_path, config_text((TOKEN, 4)))
    kubelet.wait_until(advertising(TOKEN, 4), timeout=2)
    assert ids(kubelet, TOKEN) == ["item-0", "item-1", "item-2", "item-3"]
    assert len(kubelet.register_requests) == 1  # same stream, no re-registration


def test_a_configmap_style_symlink_swap_is_picked_up(
    kubelet: FakeKubelet, daemons: StartDaemon, plugin_dir: str
) -> None:
    # The layout the kubelet gives a mounted ConfigMap: config.yaml -> ..data/config.yaml,
    # ..data -> ..<timestamp>; an update writes a new timestamp dir and renames ..data over.
    mount = os.path.join(plugin_dir, "cm")
    os.makedirs(os.path.join(mount, "..2026_01"))
    write(os.path.join(mount, "..2026_01", "config.yaml"), config_text((TOKEN, 2)))
    os.symlink("..2026_01", os.path.join(mount, "..data"))
    os.symlink("..data/config.yaml", os.path.join(mount, "config.yaml"))
    daemons(f"--plugin_dir={kubelet.directory}", f"--config={mount}/config.yaml")
    kubelet.wait_until(advertising(TOKEN, 2))
    os.makedirs(os.path.join(mount, "..2026_02"))
    write(os.path.join(mount, "..2026_02", "config.yaml"), config_text((TOKEN, 3)))
    os.symlink("..2026_02", os.path.join(mount, "..data_tmp"))
    os.rename(os.path.join(mount, "..data_tmp"), os.path.join(mount, "..data"))
    kubelet.wait_until(advertising(TOKEN, 3), timeout=2)


def test_resources_added_and_removed_at_run_time(kubelet: FakeKubelet, daemons: StartDaemon, config_path: str) -> None:
    write(config_path, config_text((TOKEN, 2)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(advertising(TOKEN, 2))
    write(config_path, config_text((TOKEN, 2), (LICENSE, 1)))
    kubelet.wait_until(advertising(LICENSE, 1))
    token_socket = kubelet.resources[TOKEN].endpoint
    assert os.path.exists(os.path.join(kubelet.directory, token_socket))
    with removed_from(kubelet.directory, token_socket):
        write(config_path, config_text((LICENSE, 1)))
    kubelet.wait_until(lambda k: not k.resources[TOKEN].connected)
    assert kubelet.allocatable(TOKEN) == 0 and advertising(LICENSE, 1)(kubelet)


def test_a_decreased_count_drops_the_highest_ids_and_running_pods_keep_theirs(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str
) -> None:
    write(config_path, config_text((TOKEN, 3)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(advertising(TOKEN, 3))
    assert [kubelet.admit(f"pod-{i}", "c", TOKEN, 1).ids for i in range(2)] == [("item-0",), ("item-1",)]
    write(config_path, config_text((TOKEN, 1)))
    kubelet.wait_until(advertising(TOKEN, 1))
    assert ids(kubelet, TOKEN) == ["item-0"]
    assert len(kubelet.allocations) == 2  # the kubelet never evicts for this
    with pytest.raises(AdmissionError, match="Requested: 1, Available: 0"):
        kubelet.admit("pod-new", "c", TOKEN, 1)
    # A kubelet that picked a dropped token before it read the new list is not refused (that
    # would fail the pod's admission), but the daemon never suggests one.
    stub = api_pb2_grpc.DevicePluginStub(kubelet.resources[TOKEN].channel)
    request = api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-2"])])
    assert dict(stub.Allocate(request, timeout=5).container_responses[0].envs) == {"EXAMPLE_COM_TOKEN": "item-2"}
    preferred = stub.GetPreferredAllocation(
        api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=["item-2", "item-1", "item-0"], allocation_size=2
                )
            ]
        ),
        timeout=5,
    )
    assert list(preferred.container_responses[0].deviceIDs) == ["item-0"]
    assert len(kubelet.register_requests) == 1  # one new snapshot on the same stream


def test_a_bad_config_is_rejected_whole_and_reported_until_fixed(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str
) -> None:
    port = free_port()
    write(config_path, config_text((TOKEN, 2)))
    daemon = start(daemons, kubelet, config_path, f"--http_port={port}", "--http_address=127.0.0.1")
    kubelet.wait_until(advertising(TOKEN, 2))
    wait_for_http(port, "/readyz", 200)
    write(config_path, config_text((TOKEN, 5), (LICENSE, -1)))
    wait_for_http(
        port,
        "/readyz",
        503,
        saying="configuration reload rejected: resources[1] (example.com/license): count must be zero or more",
    )
    samples = metric_samples(port)
    assert samples[("token_resource_config_reloads_total", (("result", "failed"),))] == 1
    assert samples[("token_resource_config_last_reload_ok", ())] == 0
    assert samples[("token_resource_config_generation", ())] == 1
    assert kubelet.allocatable(TOKEN) == 2 and ids(kubelet, TOKEN) == ["item-0", "item-1"]
    assert daemon.log().count("configuration rejected") == 1
    write(config_path, config_text((TOKEN, 5)))
    kubelet.wait_until(advertising(TOKEN, 5))
    wait_for_http(port, "/readyz", 200)
    assert metric_samples(port)[("token_resource_config_generation", ())] == 2


def test_sighup_rereads_the_file(kubelet: FakeKubelet, daemons: StartDaemon, config_path: str, plugin_dir: str) -> None:
    write(config_path, config_text((TOKEN, 2)))
    daemon = start(daemons, kubelet, config_path)
    kubelet.wait_until(advertising(TOKEN, 2))
    # Write through a hard link in another directory: the watched directory sees no event,
    # so only the signal can make the daemon notice.
    alias = os.path.join(plugin_dir, "alias.yaml")
    os.link(config_path, alias)
    with open(alias, "r+") as f:
        f.write(config_text((TOKEN, 3)))
    daemon.process.send_signal(signal.SIGHUP)
    kubelet.wait_until(advertising(TOKEN, 3))


def test_config_and_resource_flags_are_exclusive(config_path: str) -> None:
    write(config_path, config_text((TOKEN, 2)))
    result = run_to_exit(f"--config={config_path}", "--count=3")
    assert result.returncode == 1 and "--config declares the resources; drop --count" in result.stderr


def test_a_bad_config_at_start_fails_with_one_line(config_path: str) -> None:
    write(config_path, "resources: [{name: gpu}]")
    result = run_to_exit(f"--config={config_path}")
    assert result.returncode == 1
    assert f"{config_path}: resources[0] (gpu): resource name" in result.stderr and "Traceback" not in result.stderr


def test_http_endpoints_follow_registration_and_count_calls(plugin_dir: str, daemons: StartDaemon) -> None:
    port = free_port()
    daemon = daemons(f"--plugin_dir={plugin_dir}", "--count=3", f"--http_port={port}", "--http_address=127.0.0.1")
    wait_for_http(port, "/healthz", 200)
    wait_for_http(port, "/readyz", 503, saying="example.com/token: serving; registering with the kubelet")
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    try:
        kubelet.wait_until(advertising(TOKEN, 3))
        wait_for_http(port, "/readyz", 200)
        kubelet.admit("pod-a", "c", TOKEN, 2)
        stub = api_pb2_grpc.DevicePluginStub(kubelet.resources[TOKEN].channel)
        with pytest.raises(grpc.RpcError):
            stub.Allocate(
                api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["x"])])
            )
        samples = metric_samples(port)
        resource = ("resource", TOKEN)
        assert samples[("token_resource_calls_total", (("method", "Allocate"), resource))] == 2
        assert samples[("token_resource_call_errors_total", (("method", "Allocate"), resource))] == 1
        assert samples[("token_resource_calls_total", (("method", "GetPreferredAllocation"), resource))] == 1
        assert samples[("token_resource_registrations_total", (resource,))] == 1
        assert samples[("token_resource_tokens", (resource,))] == 3
        assert samples[("token_resource_registered", (resource,))] == 1
        kubelet.restart()
        kubelet.wait_until(lambda k: len(k.register_requests) == 2 and advertising(TOKEN, 3)(k))
        wait_for_http(port, "/readyz", 200)  # the daemon has taken in the registration's answer
        samples = metric_samples(port)
        # the fake kubelet's first start deleted the plugin's socket too, as a real one does
        assert samples[("token_resource_kubelet_restarts_total", (resource,))] == 2
        assert samples[("token_resource_registrations_total", (resource,))] == 2
        kubelet.stop()
        wait_for_http(port, "/readyz", 503, saying="example.com/token: serving; registering with the kubelet")
        assert http_get(port, "/healthz")[0] == 200
    finally:
        kubelet.stop()
    assert http_get(port, "/nope")[0] == 404
    assert daemon.terminate() == 0


def test_a_file_that_is_not_text_is_rejected_and_the_daemon_goes_on(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str
) -> None:
    port = free_port()
    write(config_path, config_text((TOKEN, 2)))
    daemon = start(daemons, kubelet, config_path, f"--http_port={port}", "--http_address=127.0.0.1")
    kubelet.wait_until(advertising(TOKEN, 2))
    with open(config_path, "wb") as f:
        f.write(b"resources:\n  - name: example.com/token\n    count: \xff\xfe\n")
    wait_for_http(port, "/readyz", 503, saying="configuration reload rejected: not UTF-8 text")
    assert daemon.process.poll() is None and kubelet.allocatable(TOKEN) == 2


LICENSE_SOCKET = "license.sock"  # a fixed name (socket: in the file), which another process can hold


def serve_license_on_a_held_socket(
    kubelet: FakeKubelet, daemons: Callable[..., Daemon], config_path: str
) -> tuple[Daemon, int, socket.socket]:
    """The daemon serving TOKEN; LICENSE added while another process listens on its socket,
    which stays open as long as the returned socket object does."""
    port = free_port()
    write(config_path, config_text((TOKEN, 2)))
    daemon = start(daemons, kubelet, config_path, f"--http_port={port}", "--http_address=127.0.0.1")
    kubelet.wait_until(advertising(TOKEN, 2))
    taken = os.path.join(kubelet.directory, LICENSE_SOCKET)
    other = socket.socket(socket.AF_UNIX)
    other.bind(taken)
    other.listen()
    write(config_path, config_text((TOKEN, 2), (LICENSE, 1), sockets={LICENSE: LICENSE_SOCKET}))
    wait_for_http(
        port,
        "/readyz",
        503,
        saying=f"{LICENSE}: not serving; retrying: another process is serving on {taken}; waiting for it to stop",
    )
    assert http_get(port, "/healthz")[0] == 200  # a restart would not cure it
    assert daemon.process.poll() is None and advertising(TOKEN, 2)(kubelet)
    assert LICENSE not in kubelet.resources
    return daemon, port, other


def test_a_resource_that_cannot_serve_does_not_take_the_others_down(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str
) -> None:
    daemon, port, other = serve_license_on_a_held_socket(kubelet, daemons, config_path)
    with other:
        write(config_path, config_text((TOKEN, 2)))  # withdrawn: ready again
        wait_for_http(port, "/readyz", 200)
        assert daemon.process.poll() is None and LICENSE not in kubelet.resources


@pytest.mark.parametrize("let_go", ["removed", "closed"])
def test_a_resource_whose_socket_was_held_serves_once_it_is_let_go(
    kubelet: FakeKubelet, daemons: StartDaemon, config_path: str, let_go: str
) -> None:
    daemon, port, other = serve_license_on_a_held_socket(kubelet, daemons, config_path)
    with other:
        if let_go == "removed":  # as a gRPC server stops: the daemon sees the file go, retries at once
            os.unlink(os.path.join(kubelet.directory, LICENSE_SOCKET))
    # "closed": the file stays, refusing connections; the next retry finds it stale and removes it.
    kubelet.wait_until(advertising(LICENSE, 1), timeout=2 * BACKOFF_CAP_S)
    assert [r.endpoint for r in kubelet.register_requests if r.resource_name == LICENSE] == [LICENSE_SOCKET]
    wait_for_http(port, "/readyz", 200)
    assert kubelet.admit("pod", "c", LICENSE, 1).ids == ("item-0",)
    assert daemon.process.poll() is None  # no restart
    assert daemon.log().count("cannot serve") == 1  # said once, however many retries


def test_http_on_an_ipv6_address(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    port = free_port()
    daemons(f"--plugin_dir={kubelet.directory}", f"--http_port={port}", "--http_address=::1")
    kubelet.wait_until(advertising(TOKEN, 1))
    with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5) as response:
        assert response.status == 200
