"""The real daemon against the fake kubelet, over real unix sockets."""

import os
import re
import socket
import threading
import time

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.conftest import StartDaemon, StartKubelet
from tests.daemon import Daemon, created_in, free_port, http_get, run_to_exit, wait_for_http
from tests.fake_kubelet import AdmissionError, FakeKubelet, Mode, advertising
from token_resource.backoff import BACKOFF_CAP_S

RESOURCE = "example.com/token"
SOCKET = "token-resource.sock"  # with --socket=SOCKET; without it each process has its own
INSTANCE_SOCKET = re.compile(r"token-resource\.[0-9]{1,19}\.sock")


def plugin_args(plugin_dir: str, *extra: str) -> list[str]:
    return [f"--plugin_dir={plugin_dir}", *extra]


def endpoint(kubelet: FakeKubelet) -> str:
    """The socket file name the daemon registered."""
    return kubelet.resources[RESOURCE].endpoint


@pytest.mark.parametrize("mode", [Mode.E1, Mode.E2])
def test_registers_and_advertises_its_tokens(
    plugin_dir: str, kubelets: StartKubelet, daemons: StartDaemon, mode: Mode
) -> None:
    kubelet = kubelets(mode)
    daemons(*plugin_args(plugin_dir, "--count=3"))
    kubelet.wait_until(advertising(RESOURCE, 3))
    request = kubelet.register_requests[0]
    assert (request.version, request.resource_name) == ("v1beta1", RESOURCE)
    assert INSTANCE_SOCKET.fullmatch(request.endpoint)  # its own socket: token-resource.<start ns>.sock
    assert os.path.exists(os.path.join(plugin_dir, request.endpoint))
    assert request.options.get_preferred_allocation_available
    snapshot = kubelet.resources[RESOURCE].snapshots[0]
    assert [(d.ID, d.health) for d in snapshot.devices] == [(f"item-{i}", "Healthy") for i in range(3)]


def test_a_given_socket_name_is_used_as_it_is(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemons(*plugin_args(kubelet.directory, f"--socket={SOCKET}"))
    kubelet.wait_until(advertising(RESOURCE, 1))
    assert kubelet.register_requests[0].endpoint == SOCKET
    assert sorted(os.listdir(kubelet.directory)) == ["kubelet.sock", SOCKET]


def test_sends_one_snapshot_while_nothing_changes(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemon = daemons(*plugin_args(kubelet.directory, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    kubelet.admit("pod-a", "c", RESOURCE, 1)  # traffic on the same connection
    assert len(kubelet.resources[RESOURCE].snapshots) == 1
    assert daemon.process.poll() is None


def test_allocate_preferred_and_prestart_answer(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemons(*plugin_args(kubelet.directory, "--count=3"))
    kubelet.wait_until(advertising(RESOURCE, 3))
    first = kubelet.admit("pod-a", "app", RESOURCE, 2)
    assert first.ids == ("item-0", "item-1")  # packed: lowest IDs first
    assert dict(first.response.envs) == {"EXAMPLE_COM_TOKEN": "item-0,item-1"}
    assert dict(first.response.annotations) == {RESOURCE: "item-0,item-1"}
    assert kubelet.admit("pod-b", "app", RESOURCE, 1).ids == ("item-2",)
    with pytest.raises(AdmissionError, match="Requested: 1, Available: 0"):
        kubelet.admit("pod-c", "app", RESOURCE, 1)
    assert kubelet.preferred_calls == 2

    stub = api_pb2_grpc.DevicePluginStub(kubelet.resources[RESOURCE].channel)
    assert (
        stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["item-0"]))
        == api_pb2.PreStartContainerResponse()
    )
    options = stub.GetDevicePluginOptions(api_pb2.Empty())
    assert options == kubelet.register_requests[0].options


def test_allocate_refuses_unknown_ids_with_invalid_argument(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemons(*plugin_args(kubelet.directory, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    stub = api_pb2_grpc.DevicePluginStub(kubelet.resources[RESOURCE].channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Allocate(
            api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-2"])])
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'unknown token ID "item-2"' in str(raised.value.details())
    with pytest.raises(grpc.RpcError) as raised:
        stub.Allocate(api_pb2.AllocateRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    two = stub.Allocate(
        api_pb2.AllocateRequest(
            container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["item-1"]),
                api_pb2.ContainerAllocateRequest(devices_ids=["item-0"]),
            ]
        )
    )
    assert [dict(c.envs) for c in two.container_responses] == [
        {"EXAMPLE_COM_TOKEN": "item-1"},
        {"EXAMPLE_COM_TOKEN": "item-0"},
    ]


def test_reregisters_after_kubelet_restart(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemons(*plugin_args(kubelet.directory, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    foreign = os.path.join(kubelet.directory, "kubelet_internal_checkpoint")
    with open(foreign, "w") as f:
        f.write("{}")
    kubelet.restart()  # deletes the plugin's socket, re-creates kubelet.sock
    kubelet.wait_until(lambda k: len(k.register_requests) == 2 and advertising(RESOURCE, 2)(k))
    assert kubelet.resources[RESOURCE].snapshots[-1] == kubelet.resources[RESOURCE].snapshots[0]  # same IDs
    first, second = (r.endpoint for r in kubelet.register_requests)
    assert first == second  # the same socket name, served again
    assert sorted(os.listdir(kubelet.directory)) == ["kubelet.sock", "kubelet_internal_checkpoint", first]
    assert kubelet.admit("pod-a", "c", RESOURCE, 1).ids == ("item-0",)


@pytest.mark.parametrize("mode", [Mode.E1, Mode.E2])
def test_reregisters_when_the_stream_is_cancelled(
    plugin_dir: str, kubelets: StartKubelet, daemons: StartDaemon, mode: Mode
) -> None:
    kubelet = kubelets(mode)
    daemons(*plugin_args(plugin_dir, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    kubelet.cancel_stream(RESOURCE)
    kubelet.wait_until(lambda k: len(k.register_requests) == 2 and advertising(RESOURCE, 2)(k))
    assert kubelet.resources[RESOURCE].streams_opened == 2


def test_waits_for_an_absent_kubelet(plugin_dir: str, kubelets: StartKubelet, daemons: StartDaemon) -> None:
    with created_in(plugin_dir, SOCKET):  # serving, with no kubelet.sock anywhere
        daemon = daemons(*plugin_args(plugin_dir, "--count=2", f"--socket={SOCKET}"))
    kubelet = kubelets(Mode.E2)
    kubelet.wait_until(advertising(RESOURCE, 2))
    assert daemon.process.poll() is None


def test_reregisters_when_list_and_watch_never_comes(
    plugin_dir: str, kubelets: StartKubelet, daemons: StartDaemon
) -> None:
    dial = threading.Event()  # E1 kubelet that answers Register but never dials back
    kubelet = kubelets(Mode.E1, e1_dial=dial)
    daemon = daemons(*plugin_args(plugin_dir, "--count=2", "--list_and_watch_timeout=0.5"))
    kubelet.wait_until(lambda k: len(k.register_requests) >= 2)
    assert "did not call ListAndWatch" in daemon.log()
    dial.set()
    kubelet.wait_until(advertising(RESOURCE, 2))


def test_retries_register_with_backoff_when_the_kubelet_refuses(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    kubelet.supported_versions = ["v2"]  # a kubelet that does not speak v1beta1
    daemon = daemons(*plugin_args(kubelet.directory, "--count=1"))
    kubelet.wait_until(lambda k: len(k.register_errors) >= 4, timeout=15)
    assert kubelet.register_errors[0] == (
        'requested API version "v1beta1" is not supported by kubelet. Supported version is ["v2"]'
    )
    assert "Register failed (UNKNOWN" in daemon.log()
    first, second, third, fourth = kubelet.register_times[:4]
    # The first retry is immediate (delay 0); then 0.25-0.5 s, 0.5-1 s, ...: back-off with jitter.
    assert second - first < third - second and third - second >= 0.25 and fourth - third >= 0.5
    kubelet.supported_versions = ["v1beta1"]
    kubelet.wait_until(advertising(RESOURCE, 1), timeout=15)


def test_sigterm_removes_only_its_own_socket_and_exits_0(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemon = daemons(*plugin_args(kubelet.directory, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    foreign = os.path.join(kubelet.directory, "other-plugin.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(foreign)
        started = time.monotonic()
        assert daemon.terminate() == 0
        assert time.monotonic() - started < 1.0
        assert sorted(os.listdir(kubelet.directory)) == ["kubelet.sock", "other-plugin.sock"]
    kubelet.wait_until(lambda k: not k.resources[RESOURCE].connected)
    assert kubelet.allocatable(RESOURCE) == 0 and kubelet.resources[RESOURCE].capacity == 2


def make_stale_socket(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(path)  # bound but not listening: what a killed process leaves


def test_a_stale_socket_does_not_block_start(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    make_stale_socket(os.path.join(kubelet.directory, SOCKET))
    daemons(*plugin_args(kubelet.directory, "--count=2", f"--socket={SOCKET}"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    assert endpoint(kubelet) == SOCKET


def test_a_dead_older_instances_socket_is_removed_at_start(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    dead = os.path.join(kubelet.directory, "token-resource.1.sock")  # instance 1: long before this one
    make_stale_socket(dead)
    daemons(*plugin_args(kubelet.directory, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    assert sorted(os.listdir(kubelet.directory)) == ["kubelet.sock", endpoint(kubelet)]


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_second_instance_on_a_fixed_socket_waits_and_takes_over(
    kubelet: FakeKubelet, daemons: StartDaemon, stop: str
) -> None:
    fixed = ("--count=2", f"--socket={SOCKET}")
    first = daemons(*plugin_args(kubelet.directory, *fixed))
    kubelet.wait_until(advertising(RESOURCE, 2))
    port = free_port()
    second = daemons(*plugin_args(kubelet.directory, *fixed, f"--http_port={port}", "--http_address=127.0.0.1"))
    path = os.path.join(kubelet.directory, SOCKET)
    waiting = f"cannot serve: another process is serving on {path}; waiting for it to stop"
    second.wait_for_log(waiting)
    wait_for_http(
        port, "/readyz", 503, saying=f"{RESOURCE}: not serving; retrying: another process is serving on {path}"
    )
    assert http_get(port, "/healthz")[0] == 200  # a restart would not cure it: no liveness failure
    assert first.process.poll() is None and second.process.poll() is None  # no crash loop
    assert len(kubelet.register_requests) == 1  # the first instance's registration is left alone
    stopped = time.monotonic()
    if stop == "sigterm":
        assert first.terminate() == 0  # removes its socket: the second retries at once
    else:
        first.process.kill()  # leaves a stale socket, found at the next retry
        first.wait()
    kubelet.wait_until(
        lambda k: len(k.register_requests) == 2 and advertising(RESOURCE, 2)(k), timeout=2 * BACKOFF_CAP_S
    )
    assert kubelet.register_times[1] - stopped < BACKOFF_CAP_S  # within one back-off step at most
    assert kubelet.register_requests[1].endpoint == SOCKET
    assert kubelet.admit("pod-a", "c", RESOURCE, 1).ids == ("item-0",)
    wait_for_http(port, "/readyz", 200)
    assert second.process.poll() is None
    assert second.log().count("cannot serve") == 1  # said once, however many retries


def test_the_go_plugins_command_line_starts_it(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemon = daemons(
        "-loglevel",
        "0",
        "-socket",
        "token-resource",
        "-count",
        "2",
        "-resource",
        RESOURCE,
        f"-plugin_dir={kubelet.directory}",
    )
    kubelet.wait_until(advertising(RESOURCE, 2))
    assert kubelet.register_requests[0].endpoint == "token-resource"
    assert daemon.terminate() == 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--count=0"], "flag --count=0: must be a positive integer, not 0"),
        (["--count=-3"], "must be a positive integer, not -3"),
        (["--count=two"], "--count"),
        (
            ["--count=1000000"],
            "1000000 is too large: one ListAndWatch snapshot must stay under the kubelet's 4 MiB message limit, "
            "which fits at most 179392 tokens",
        ),
        (["--resource=gpu"], "needs a domain prefix"),
        (["--resource=kubernetes.io/x"], "reserved"),
        (["--resource=Example.com/x"], "lower-case DNS subdomain"),
        (["--resource=requests.x.com/y"], 'must not start with "requests."'),
        (["--socket=/var/lib/kubelet/device-plugins/x.sock"], "bare file name"),
        (["--socket=kubelet.sock"], "kubelet's own socket"),
        (["--plugin_dir=/nonexistent/device-plugins"], "does not exist"),
        (["--no_such_flag"], "Unknown command line flag"),
        (["--http_port=70000"], "flag --http_port=70000"),
        (["extra-argument"], "unexpected arguments"),
    ],
)
def test_bad_input_fails_with_one_clear_line(flags: list[str], message: str) -> None:
    result = run_to_exit(*flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version_prints_and_exits() -> None:
    result = run_to_exit("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("token-resource ")


def test_a_relative_plugin_dir_works(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    parent, name = os.path.split(kubelet.directory)
    daemon = Daemon("--plugin_dir=" + name, "--count=2", cwd=parent)
    try:
        kubelet.wait_until(advertising(RESOURCE, 2))
    finally:
        daemon.terminate()
        daemon.close()


def test_only_the_kubelets_stream_ending_means_registering_again(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemons(*plugin_args(kubelet.directory, "--count=2"))
    kubelet.wait_until(advertising(RESOURCE, 2))
    with grpc.insecure_channel(f"unix://{kubelet.directory}/{endpoint(kubelet)}") as tool:
        watcher = api_pb2_grpc.DevicePluginStub(tool).ListAndWatch(api_pb2.Empty())
        next(watcher)  # a tool watching the device list
        watcher.cancel()
        kubelet.admit("pod-a", "c", RESOURCE, 1)  # a round trip after the tool's stream ended
        assert len(kubelet.register_requests) == 1
        other = api_pb2_grpc.DevicePluginStub(tool).ListAndWatch(api_pb2.Empty())
        next(other)  # another stream stays open ...
        kubelet.cancel_stream(RESOURCE)  # ... while the kubelet's ends
        kubelet.wait_until(lambda k: len(k.register_requests) == 2 and advertising(RESOURCE, 2)(k))
        other.cancel()
