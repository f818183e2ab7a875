"""The fake kubelet's model of two plugin instances registering one resource, per era (§8.2),
driven in-process with small real plugin servers on unix sockets."""

import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.fake_kubelet import Connection, FakeKubelet, Mode, already_tracked_error

Kubelets = Callable[..., FakeKubelet]
Plugins = Callable[..., "StubPlugin"]

RESOURCE = "example.com/token"


class StubPlugin(api_pb2_grpc.DevicePluginServicer):
    """One plugin instance: serves `endpoint` in the directory, streams its device list on every
    change, and holds each ListAndWatch stream open until the kubelet or stop() ends it."""

    def __init__(self, directory: str, endpoint: str, count: int = 2, options_fail: bool = False) -> None:
        self.endpoint = endpoint
        self.options_fail = options_fail
        self.cancelled = threading.Event()  # a stream was ended by the kubelet, not by stop()
        self._changed = threading.Condition()
        self._ids = [f"dev-{i}" for i in range(count)]
        self._version = 0
        self._stopping = False
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{os.path.join(directory, endpoint)}")
        self._server.start()

    def register(self, kubelet: FakeKubelet, resource: str = RESOURCE) -> None:
        with grpc.insecure_channel(f"unix://{kubelet.socket_path}") as channel:
            api_pb2_grpc.RegistrationStub(channel).Register(
                api_pb2.RegisterRequest(version="v1beta1", endpoint=self.endpoint, resource_name=resource),
                timeout=30,
            )

    def update(self, count: int) -> None:
        with self._changed:
            self._ids = [f"dev-{i}" for i in range(count)]
            self._version += 1
            self._changed.notify_all()

    def stop(self) -> None:
        """The process goes away: every stream ends with an error on the kubelet's side."""
        self._stopping = True  # no notify: the streams must be aborted by the server, not returned
        self._server.stop(None).wait()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        if self.options_fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not ready")
        return api_pb2.DevicePluginOptions()

    def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> api_pb2.AllocateResponse:
        return api_pb2.AllocateResponse(
            container_responses=[
                api_pb2.ContainerAllocateResponse(envs={"INSTANCE": self.endpoint}) for _ in request.container_requests
            ]
        )

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        ended = threading.Event()

        def on_end() -> None:
            with self._changed:
                ended.set()
                self._changed.notify_all()

        context.add_callback(on_end)
        sent = -1
        while True:
            with self._changed:
                while self._version == sent and not ended.is_set():
                    self._changed.wait()
                if ended.is_set():
                    break
                sent, ids = self._version, list(self._ids)
            yield api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=i, health="Healthy") for i in ids])
        if not self._stopping:
            self.cancelled.set()


@pytest.fixture
def plugins(plugin_dir: str) -> Iterator[Callable[..., StubPlugin]]:
    started: list[StubPlugin] = []

    def start(endpoint: str, count: int = 2, options_fail: bool = False) -> StubPlugin:
        plugin = StubPlugin(plugin_dir, endpoint, count, options_fail)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.stop()


def connection(kubelet: FakeKubelet, endpoint: str) -> Connection:
    """The kubelet's newest connection to `endpoint`."""
    return next(c for c in reversed(kubelet.resources[RESOURCE].connections) if c.endpoint == endpoint)


def serving(endpoint: str, count: int = 2) -> Callable[[FakeKubelet], bool]:
    """The resource's current endpoint is `endpoint`, it has streamed, and `count` are allocatable."""

    def predicate(kubelet: FakeKubelet) -> bool:
        resource = kubelet.resources.get(RESOURCE)
        return (
            resource is not None
            and resource.connected
            and resource.endpoint == endpoint
            and connection(kubelet, endpoint).snapshots > 0
            and resource.allocatable == count
        )

    return predicate


def cleaned_up(endpoint: str) -> Callable[[FakeKubelet], bool]:
    """The kubelet has handled the end of the stream of its newest connection to `endpoint`."""
    return lambda kubelet: connection(kubelet, endpoint).cleaned_up


def two_instances(kubelet: FakeKubelet, plugins: Callable[..., StubPlugin]) -> tuple[StubPlugin, StubPlugin]:
    """A registers, then B registers while A's stream is still open (a surge upgrade)."""
    a = plugins("a.sock")
    a.register(kubelet)
    kubelet.wait_until(serving("a.sock"))
    b = plugins("b.sock")
    b.register(kubelet)
    kubelet.wait_until(serving("b.sock"))
    assert [c.endpoint for c in kubelet.resources[RESOURCE].open_streams] == ["a.sock", "b.sock"]
    return a, b


@pytest.mark.parametrize(
    "mode,b_disconnected,marks",
    [
        (Mode.E1, False, 0),  # the replaced endpoint is not current: its end changes nothing
        (Mode.E2, True, 1),  # clean-up by name finds B: B is disconnected (#121994)
        (Mode.E3, False, 0),  # only A's own instance goes
    ],
)
def test_the_replaced_instance_going_away(
    kubelets: Kubelets, plugins: Plugins, mode: Mode, b_disconnected: bool, marks: int
) -> None:
    kubelet = kubelets(mode)
    a, b = two_instances(kubelet, plugins)
    resource = kubelet.resources[RESOURCE]
    assert [r.endpoint for r in resource.registrations] == ["a.sock", "b.sock"]
    a.stop()
    kubelet.wait_until(cleaned_up("a.sock"))
    if b_disconnected:
        kubelet.wait_until(cleaned_up("b.sock"))
        assert b.cancelled.wait(5)  # B sees its ListAndWatch cancelled
        assert (resource.connected, resource.allocatable, resource.capacity) == (False, 0, 2)
    else:
        assert connection(kubelet, "b.sock").stream_open and not b.cancelled.is_set()
        assert (resource.connected, resource.endpoint, resource.allocatable) == (True, "b.sock", 2)
    assert resource.unhealthy_marks == marks

    b.stop()  # the last instance goes: the resource is unhealthy in every era
    kubelet.wait_until(cleaned_up("b.sock"))
    assert (resource.connected, resource.allocatable, resource.unhealthy_marks) == (False, 0, 1)
    assert resource.open_streams == []


@pytest.mark.parametrize(
    "mode,marks,current",
    [
        (Mode.E1, 1, "b.sock"),  # the current endpoint's end marks it; A is never told (§8.2)
        (Mode.E2, 1, "b.sock"),  # B is the client under the name
        (Mode.E3, 0, "a.sock"),  # A is still tracked: allocation moves back to it
    ],
)
def test_the_newest_instance_going_away_while_the_replaced_one_runs(
    kubelets: Kubelets, plugins: Plugins, mode: Mode, marks: int, current: str
) -> None:
    kubelet = kubelets(mode)
    a, b = two_instances(kubelet, plugins)
    resource = kubelet.resources[RESOURCE]
    b.stop()
    kubelet.wait_until(cleaned_up("b.sock"))
    assert resource.unhealthy_marks == marks and resource.endpoint == current
    assert connection(kubelet, "a.sock").stream_open and not a.cancelled.is_set()
    if mode is Mode.E3:
        assert dict(kubelet.admit("pod", "c", RESOURCE, 1).response.envs) == {"INSTANCE": "a.sock"}
    a.stop()  # in E2 A's end is not cleaned up at all: B's disconnect deleted the name's client
    kubelet.wait_until(cleaned_up("a.sock"))
    assert resource.unhealthy_marks == 1 and not resource.connected


@pytest.mark.parametrize("mode", list(Mode))
def test_every_open_stream_updates_the_device_sets(kubelets: Kubelets, plugins: Plugins, mode: Mode) -> None:
    kubelet = kubelets(mode)
    a, _ = two_instances(kubelet, plugins)
    a.update(3)  # the replaced instance's snapshot still overwrites the resource's sets
    kubelet.wait_until(lambda k: k.resources[RESOURCE].allocatable == 3)
    assert kubelet.resources[RESOURCE].endpoint == "b.sock"


@pytest.mark.parametrize("mode,marks", [(Mode.E2, 0), (Mode.E3, 1)])
def test_a_failed_register_and_the_working_instance(
    kubelets: Kubelets, plugins: Plugins, mode: Mode, marks: int
) -> None:
    kubelet = kubelets(mode)
    a = plugins("a.sock")
    a.register(kubelet)
    kubelet.wait_until(serving("a.sock"))
    broken = plugins("broken.sock", options_fail=True)
    with pytest.raises(grpc.RpcError) as raised:
        broken.register(kubelet)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert raised.value.details() == "failed to get device plugin options: not ready"
    a.stop()
    kubelet.wait_until(cleaned_up("a.sock"))
    resource = kubelet.resources[RESOURCE]
    assert resource.unhealthy_marks == marks
    # E2 forgot A's client when the broken Register failed, so A's end is never cleaned up and the
    # node keeps advertising devices nobody serves; E3 only dropped the broken instance.
    assert (resource.connected, resource.allocatable) == ((True, 2) if mode is Mode.E2 else (False, 0))


def test_e3_refuses_a_socket_path_that_is_still_tracked(kubelets: Kubelets, plugins: Plugins) -> None:
    kubelet = kubelets(Mode.E3)
    a = plugins("a.sock")
    a.register(kubelet)
    kubelet.wait_until(serving("a.sock"))
    with pytest.raises(grpc.RpcError) as raised:
        a.register(kubelet)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert raised.value.details() == already_tracked_error(RESOURCE, os.path.join(kubelet.directory, "a.sock"))
    resource = kubelet.resources[RESOURCE]
    assert resource.streams_opened == 1 and resource.connected

    kubelet.cancel_stream(RESOURCE)  # once the instance is gone, the path may register again
    kubelet.wait_until(cleaned_up("a.sock"))
    assert a.cancelled.wait(5)
    a.register(kubelet)
    kubelet.wait_until(lambda k: resource.streams_opened == 2 and serving("a.sock")(k))
    assert [r.endpoint for r in resource.registrations] == ["a.sock"] * 3


@pytest.mark.parametrize("mode", [Mode.E1, Mode.E2])
def test_e1_and_e2_accept_a_second_registration_of_the_same_socket(
    kubelets: Kubelets, plugins: Plugins, mode: Mode
) -> None:
    kubelet = kubelets(mode)
    a = plugins("a.sock")
    a.register(kubelet)
    kubelet.wait_until(serving("a.sock"))
    a.register(kubelet)
    kubelet.wait_until(lambda k: k.resources[RESOURCE].streams_opened == 2)
    assert len(kubelet.resources[RESOURCE].open_streams) == 2


def test_cancel_stream_of_one_e3_instance_leaves_the_other(kubelets: Kubelets, plugins: Plugins) -> None:
    kubelet = kubelets(Mode.E3)
    a, b = two_instances(kubelet, plugins)
    kubelet.cancel_stream(RESOURCE, "a.sock")
    assert a.cancelled.wait(5)
    kubelet.wait_until(cleaned_up("a.sock"))
    resource = kubelet.resources[RESOURCE]
    assert (resource.unhealthy_marks, resource.endpoint, resource.allocatable) == (0, "b.sock", 2)
    assert not b.cancelled.is_set()


def test_node_status_keeps_a_stopped_resource_for_the_grace_period(plugin_dir: str, plugins: Plugins) -> None:
    now = [1000.0]
    kubelet = FakeKubelet(plugin_dir, Mode.E2, clock=lambda: now[0])
    kubelet.start()
    try:
        a = plugins("a.sock")
        a.register(kubelet)
        kubelet.wait_until(serving("a.sock"))
        assert kubelet.node_status() == {RESOURCE: (2, 2)}
        a.stop()
        kubelet.wait_until(cleaned_up("a.sock"))
        assert kubelet.node_status() == {RESOURCE: (2, 0)}  # capacity kept, allocatable 0
        now[0] += 300.0
        assert kubelet.node_allocatable(RESOURCE) == 0 and kubelet.node_status()[RESOURCE] == (2, 0)
        now[0] += 0.5
        assert kubelet.node_status() == {RESOURCE: (0, 0)}  # dropped: written as an explicit 0
        b = plugins("b.sock")
        b.register(kubelet)
        kubelet.wait_until(serving("b.sock"))
        assert kubelet.node_status() == {RESOURCE: (2, 2)}
        assert kubelet.violations == []
    finally:
        kubelet.stop()


def test_a_kubelet_restart_is_not_an_unhealthy_mark(kubelets: Kubelets, plugins: Plugins) -> None:
    kubelet = kubelets(Mode.E2)
    a = plugins("a.sock")
    a.register(kubelet)
    kubelet.wait_until(serving("a.sock"))
    kubelet.restart()  # deletes a.sock; the stub keeps its listening fd, like a plugin that has not noticed
    resource = kubelet.resources[RESOURCE]
    assert (resource.capacity, resource.allocatable, resource.options, resource.unhealthy_marks) == (0, 0, None, 0)
    b = plugins("b.sock")
    b.register(kubelet)
    kubelet.wait_until(serving("b.sock"))
    assert resource.unhealthy_marks == 0
    assert [allocatable for _, allocatable in resource.allocatable_history] == [2, 0, 2]
