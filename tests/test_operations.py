"""Several resources, per-node counts, live reconfiguration, and the HTTP endpoint, with the
real daemon against fake kubelets."""

import os
import signal
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import free_port
from tests.fake_kubelet import AdmissionError, advertising

TOKEN = "example.com/token"
LICENSE = "example.com/license"


def config_text(*resources: tuple[str, int], extra: str = "") -> str:
    lines = ["resources:"]
    for name, count in resources:
        lines += [f"  - name: {name}", f"    count: {count}"]
    return "\n".join(lines) + "\n" + extra


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def ids(kubelet, resource: str) -> list[str]:
    return [d.ID for d in kubelet.resources[resource].snapshots[-1].devices]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_http(port: int, path: str, code: int, saying: str = "", timeout: float = 10.0) -> str:
    """Polls the endpoint until it answers `code` with `saying` in the body (an HTTP probe is
    itself a poll)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = get(port, path)
        except OSError:
            status, body = 0, "no answer"
        if status == code and saying in body:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} answered {status} {body!r}, expected {code} saying {saying!r}")
        time.sleep(0.05)


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def config_path(plugin_dir):
    directory = os.path.join(plugin_dir, "config")
    os.mkdir(directory)
    return os.path.join(directory, "config.yaml")


def start(daemons, kubelet, config_path, *extra):
    return daemons(f"--plugin_dir={kubelet.directory}", f"--config={config_path}", *extra)


def test_two_resources_from_one_config_each_with_its_own_socket(kubelet, daemons, config_path):
    write(config_path, config_text((TOKEN, 2), (LICENSE, 3)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(lambda k: advertising(TOKEN, 2)(k) and advertising(LICENSE, 3)(k))
    assert {r.resource_name: r.endpoint for r in kubelet.register_requests} == {
        TOKEN: "token-resource-example.com_token.sock",
        LICENSE: "token-resource-example.com_license.sock",
    }
    assert ids(kubelet, LICENSE) == ["item-0", "item-1", "item-2"]
    assert dict(kubelet.admit("pod", "c", LICENSE, 1).response.envs) == {"EXAMPLE_COM_LICENSE": "item-0"}


@pytest.mark.parametrize("node,count", [("worker-1", 5), ("worker-2", 2)])
def test_per_node_count_applies_to_the_named_node_only(kubelet, daemons, config_path, node, count):
    write(config_path, config_text((TOKEN, 2)) + "    nodes: {worker-1: 5}\n")
    start(daemons, kubelet, config_path, f"--node_name={node}")
    kubelet.wait_until(advertising(TOKEN, count))


def test_node_name_comes_from_the_environment(kubelet, config_path, plugin_dir):
    from tests.daemon import Daemon

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


def test_an_edited_file_sends_a_new_snapshot_keeping_ids(kubelet, daemons, config_path):
    write(config_path, config_text((TOKEN, 2)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(advertising(TOKEN, 2))
    write(config_path, config_text((TOKEN, 4)))
    kubelet.wait_until(advertising(TOKEN, 4), timeout=2)
    assert ids(kubelet, TOKEN) == ["item-0", "item-1", "item-2", "item-3"]
    assert len(kubelet.register_requests) == 1  # same stream, no re-registration


def test_a_configmap_style_symlink_swap_is_picked_up(kubelet, daemons, plugin_dir):
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


def test_resources_added_and_removed_at_run_time(kubelet, daemons, config_path):
    write(config_path, config_text((TOKEN, 2)))
    start(daemons, kubelet, config_path)
    kubelet.wait_until(advertising(TOKEN, 2))
    write(config_path, config_text((TOKEN, 2), (LICENSE, 1)))
    kubelet.wait_until(advertising(LICENSE, 1))
    write(config_path, config_text((LICENSE, 1)))
    kubelet.wait_until(lambda k: not k.resources[TOKEN].connected)
    assert not os.path.exists(os.path.join(kubelet.directory, "token-resource-example.com_token.sock"))
    assert kubelet.allocatable(TOKEN) == 0 and advertising(LICENSE, 1)(kubelet)


def test_a_decreased_count_drops_the_highest_ids_and_running_pods_keep_theirs(kubelet, daemons, config_path):
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


def test_a_bad_config_is_rejected_whole_and_reported_until_fixed(kubelet, daemons, config_path):
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


def test_sighup_rereads_the_file(kubelet, daemons, config_path, plugin_dir):
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


def test_config_and_resource_flags_are_exclusive(config_path):
    from tests.daemon import run_to_exit

    write(config_path, config_text((TOKEN, 2)))
    result = run_to_exit(f"--config={config_path}", "--count=3")
    assert result.returncode == 1 and "--config declares the resources; drop --count" in result.stderr


def test_a_bad_config_at_start_fails_with_one_line(config_path):
    from tests.daemon import run_to_exit

    write(config_path, "resources: [{name: gpu}]")
    result = run_to_exit(f"--config={config_path}")
    assert result.returncode == 1
    assert f"{config_path}: resources[0] (gpu): resource name" in result.stderr and "Traceback" not in result.stderr


def test_http_endpoints_follow_registration_and_count_calls(plugin_dir, daemons):
    from tests.fake_kubelet import FakeKubelet, Mode

    port = free_port()
    daemon = daemons(f"--plugin_dir={plugin_dir}", "--count=3", f"--http_port={port}", "--http_address=127.0.0.1")
    wait_for_http(port, "/healthz", 200)
    wait_for_http(port, "/readyz", 503, saying="example.com/token: not registered with the kubelet")
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    try:
        kubelet.wait_until(advertising(TOKEN, 3))
        wait_for_http(port, "/readyz", 200)
        kubelet.admit("pod-a", "c", TOKEN, 2)
        from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

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
        wait_for_http(port, "/readyz", 503, saying="not registered")
        assert get(port, "/healthz")[0] == 200
    finally:
        kubelet.stop()
    assert get(port, "/nope")[0] == 404
    assert daemon.terminate() == 0


def test_a_file_that_is_not_text_is_rejected_and_the_daemon_goes_on(kubelet, daemons, config_path):
    port = free_port()
    write(config_path, config_text((TOKEN, 2)))
    daemon = start(daemons, kubelet, config_path, f"--http_port={port}", "--http_address=127.0.0.1")
    kubelet.wait_until(advertising(TOKEN, 2))
    with open(config_path, "wb") as f:
        f.write(b"resources:\n  - name: example.com/token\n    count: \xff\xfe\n")
    wait_for_http(port, "/readyz", 503, saying="configuration reload rejected: not UTF-8 text")
    assert daemon.process.poll() is None and kubelet.allocatable(TOKEN) == 2


def test_a_resource_that_cannot_serve_does_not_take_the_others_down(kubelet, daemons, config_path):
    port = free_port()
    write(config_path, config_text((TOKEN, 2)))
    daemon = start(daemons, kubelet, config_path, f"--http_port={port}", "--http_address=127.0.0.1")
    kubelet.wait_until(advertising(TOKEN, 2))
    taken = os.path.join(kubelet.directory, "token-resource-example.com_license.sock")
    with socket.socket(socket.AF_UNIX) as other:  # another process serves on the new socket
        other.bind(taken)
        other.listen()
        write(config_path, config_text((TOKEN, 2), (LICENSE, 1)))
        wait_for_http(port, "/readyz", 503, saying=f"{LICENSE}: cannot serve: another process is serving on {taken}")
        assert get(port, "/healthz")[0] == 200  # a restart would not cure it
        assert daemon.process.poll() is None and advertising(TOKEN, 2)(kubelet)
        write(config_path, config_text((TOKEN, 2)))  # withdrawn: ready again
        wait_for_http(port, "/readyz", 200)


def test_http_on_an_ipv6_address(kubelet, daemons):
    port = free_port()
    daemons(f"--plugin_dir={kubelet.directory}", f"--http_port={port}", "--http_address=::1")
    kubelet.wait_until(advertising(TOKEN, 1))
    with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5) as response:
        assert response.status == 200
