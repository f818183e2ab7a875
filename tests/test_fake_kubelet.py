"""The fake kubelet's model of two plugin instances registering one resource, per era (§8.2),
and its 1.20 plugin watcher (§7.6), driven in-process with small real plugin servers on unix
sockets."""

import concurrent.futures
import dataclasses
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pluginregistration.v1 import api_pb2 as registration_pb2
from pluginregistration.v1 import api_pb2_grpc as registration_pb2_grpc
from tests.fake_kubelet import (
    FAST_WATCHER,
    Connection,
    FakeKubelet,
    Mode,
    Notification,
    WatcherTiming,
    already_tracked_error,
    newest_connection,
    reconciler_passes,
    serving_from,
)

Kubelets = Callable[..., FakeKubelet]
Plugins = Callable[..., "StubPlugin"]

RESOURCE = "example.com/token"


class StubPlugin(api_pb2_grpc.DevicePluginServicer):
    """One plugin instance: serves `endpoint` in the directory, streams its device list on every
    change, and holds each ListAndWatch stream open until the kubelet or stop() ends it."""

    def __init__(
        self,
        directory: str,
        endpoint: str,
        count: int = 2,
        options_fail: bool = False,
        registration: "StubRegistration | None" = None,
    ) -> None:
        self.endpoint = endpoint
        self.path = os.path.join(directory, endpoint)
        self.options_fail = options_fail
        self.cancelled = threading.Event()  # a stream was ended by the kubelet, not by stop()
        self._changed = threading.Condition()
        self._ids = [f"dev-{i}" for i in range(count)]
        self._version = 0
        self._stopping = False
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, self._server)
        if registration is not None:  # a plugin-watcher plugin: the same socket serves both
            registration_pb2_grpc.add_RegistrationServicer_to_server(registration, self._server)
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
    return newest_connection(kubelet, RESOURCE, endpoint)


def serving(endpoint: str, count: int = 2) -> Callable[[FakeKubelet], bool]:
    return serving_from(RESOURCE, endpoint, count)


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


# The plugin watcher (1.20, §7.6) -------------------------------------------------------------


class StubRegistration(registration_pb2_grpc.RegistrationServicer):
    """The plugin watcher's side of a plugin: answers GetInfo with `info` (held back while `hold`
    is clear) and records every NotifyRegistrationStatus."""

    def __init__(self, info: registration_pb2.PluginInfo) -> None:
        self.info = info
        self.hold = threading.Event()
        self.hold.set()
        self.statuses: list[tuple[bool, str]] = []

    def GetInfo(
        self, request: registration_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> registration_pb2.PluginInfo:
        self.hold.wait(10)
        return self.info

    def NotifyRegistrationStatus(
        self, request: registration_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> registration_pb2.RegistrationStatusResponse:
        self.statuses.append((request.plugin_registered, request.error))
        return registration_pb2.RegistrationStatusResponse()


def plugin_info(
    name: str = RESOURCE,
    type: str = "DevicePlugin",
    endpoint: str = "",
    supported_versions: tuple[str, ...] = ("v1beta1",),
) -> registration_pb2.PluginInfo:
    return registration_pb2.PluginInfo(type=type, name=name, endpoint=endpoint, supported_versions=supported_versions)


@dataclasses.dataclass
class Watched:
    kubelet: FakeKubelet
    registry: str
    start_plugin: Callable[..., tuple[StubPlugin, StubRegistration]]

    def notified(self, path: str, registered: bool = True, error: str = "") -> Callable[[FakeKubelet], bool]:
        return lambda kubelet: Notification(path, registered, error) in kubelet.notifications

    def attempts(self, path: str) -> list:
        return [a for a in self.kubelet.watcher_attempts if a.socket_path == path]


@pytest.fixture
def watched(plugin_dir: str, registry: str) -> Iterator[Callable[..., Watched]]:
    """start(timing) -> Watched: an E1 fake kubelet with the plugin watcher on `registry`, and a
    way to start plugins serving Registration + DevicePlugin there. The test fails if the
    kubelet saw a protocol rule broken (a test that expects some clears them)."""
    started: list[StubPlugin] = []
    kubelets: list[FakeKubelet] = []

    def start_plugin(
        name: str, info: registration_pb2.PluginInfo | None = None, directory: str | None = None, count: int = 2
    ) -> tuple[StubPlugin, StubRegistration]:
        registration = StubRegistration(info or plugin_info())
        plugin = StubPlugin(directory or registry, name, count, registration=registration)
        started.append(plugin)
        return plugin, registration

    def start(timing: WatcherTiming = FAST_WATCHER) -> Watched:
        kubelet = FakeKubelet(plugin_dir, Mode.E1, registry_dir=registry, watcher=timing)
        kubelet.start()
        kubelets.append(kubelet)
        return Watched(kubelet, registry, start_plugin)

    yield start
    for kubelet in kubelets:
        kubelet.stop()
    for plugin in started:
        plugin.stop()
    for kubelet in kubelets:
        assert kubelet.violations == []


def test_the_watcher_registers_sockets_found_at_start_and_created_later(
    registry: str, watched: Callable[..., Watched]
) -> None:
    early = StubPlugin(registry, "early.sock", registration=StubRegistration(plugin_info("example.com/early")))
    try:
        with open(os.path.join(registry, "not-a-socket"), "w"):
            pass
        w = watched()
        w.kubelet.wait_until(w.notified(early.path))
        os.mkdir(os.path.join(registry, "sub"))
        late, late_registration = w.start_plugin("sub/late.sock")  # subdirectories are watched too
        w.start_plugin(".hidden.sock")  # names starting with "." are ignored
        w.kubelet.wait_until(w.notified(late.path))
        assert late_registration.statuses == [(True, "")]
        w.kubelet.wait_until(serving(late.path))
        w.kubelet.wait_until(lambda k: k.resources["example.com/early"].allocatable == 2)
        assert w.kubelet.registered_plugins() == {early.path: "example.com/early", late.path: RESOURCE}
        assert {a.socket_path for a in w.kubelet.watcher_attempts} == {early.path, late.path}
        # The empty endpoint is the registration socket itself: Allocate goes there.
        assert dict(w.kubelet.admit("pod", "c", RESOURCE, 1).response.envs) == {"INSTANCE": "sub/late.sock"}
        assert w.kubelet.resources[RESOURCE].options is not None  # from GetDevicePluginOptions
    finally:
        early.stop()


@pytest.mark.parametrize(
    "info,error",
    [
        (
            plugin_info("kubernetes.io/token"),
            "RegisterPlugin error -- plugin validation failed with err: invalid name of device plugin socket: "
            'the ResourceName "kubernetes.io/token" is invalid',
        ),
        (
            plugin_info(supported_versions=("v1alpha1", "v1")),
            "RegisterPlugin error -- plugin validation failed with err: manager version, v1beta1, is not among "
            "plugin supported versions [v1alpha1 v1]",
        ),
        (
            plugin_info(type="CSIPlugin"),
            "RegisterPlugin error -- no handler registered for plugin type: CSIPlugin at socket {path}",
        ),
    ],
)
def test_a_plugin_refused_before_registration_is_told_and_retried_with_backoff(
    watched: Callable[..., Watched], info: registration_pb2.PluginInfo, error: str
) -> None:
    w = watched()
    plugin, registration = w.start_plugin("p.sock", info)
    text = error.format(path=plugin.path)
    w.kubelet.wait_until(lambda k: len(w.attempts(plugin.path)) >= 3)
    assert {a.error for a in w.attempts(plugin.path)} <= {
        text,
        "RegisterPlugin error -- pluginHandler.ValidatePluginFunc failed",
    }
    assert registration.statuses[0] == (False, text)
    times = [a.time for a in w.attempts(plugin.path)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= FAST_WATCHER.backoff_initial and gaps[1] >= 2 * FAST_WATCHER.backoff_initial  # doubling
    assert w.kubelet.registered_plugins() == {}
    registration.info = plugin_info()  # fixed: a later retry registers it
    w.kubelet.wait_until(w.notified(plugin.path))
    w.kubelet.wait_until(serving(plugin.path))


def test_a_failed_register_plugin_is_told_and_never_retried(watched: Callable[..., Watched]) -> None:
    w = watched()
    w.kubelet.fail_register_plugin()
    plugin, registration = w.start_plugin("p.sock")
    text = (
        f"RegisterPlugin error -- plugin registration failed with err: failed to dial device plugin with socketPath "
        f"{plugin.path}: failed to dial device plugin: context deadline exceeded"
    )
    w.kubelet.wait_until(w.notified(plugin.path, False, text))
    w.kubelet.wait_until(reconciler_passes(20))  # well past the back-off: kubernetes#127457
    assert len(w.attempts(plugin.path)) == 1 and registration.statuses == [(False, text)]
    assert w.kubelet.registered_plugins() == {plugin.path: RESOURCE}  # recorded as registered
    assert RESOURCE not in w.kubelet.resources or not w.kubelet.resources[RESOURCE].connected

    plugin.stop()  # what the plugin must do: re-create its socket (unregister, then register)
    _, again_registration = w.start_plugin("p.sock")
    w.kubelet.wait_until(lambda k: len(w.attempts(plugin.path)) == 2 and serving(plugin.path)(k))
    assert again_registration.statuses == [(True, "")]
    assert w.kubelet.deregistrations == [(plugin.path, RESOURCE)]


def test_options_refused_on_register_plugin(watched: Callable[..., Watched], registry: str) -> None:
    w = watched()
    registration = StubRegistration(plugin_info())
    plugin = StubPlugin(registry, "p.sock", options_fail=True, registration=registration)
    try:
        text = (
            "RegisterPlugin error -- plugin registration failed with err: failed to get device plugin options: "
            "rpc error: code = Unavailable desc = not ready"
        )
        w.kubelet.wait_until(w.notified(plugin.path, False, text))
        assert registration.statuses == [(False, text)]
    finally:
        plugin.stop()


def test_removing_a_socket_deregisters_the_resource_name_not_the_socket(watched: Callable[..., Watched]) -> None:
    w = watched()
    a, _ = w.start_plugin("a.sock")
    w.kubelet.wait_until(serving(a.path))
    b, _ = w.start_plugin("b.sock")
    w.kubelet.wait_until(serving(b.path))
    os.unlink(a.path)  # A's socket goes; 1.20 stops the *current* endpoint of the name: B's
    assert b.cancelled.wait(5)
    w.kubelet.wait_until(cleaned_up(b.path))
    resource = w.kubelet.resources[RESOURCE]
    assert (resource.connected, resource.allocatable, resource.unhealthy_marks) == (False, 0, 1)
    assert connection(w.kubelet, a.path).stream_open and not a.cancelled.is_set()
    assert w.kubelet.deregistrations == [(a.path, RESOURCE)]
    assert w.kubelet.registered_plugins() == {b.path: RESOURCE}


def test_a_kubelet_restart_registers_the_registry_again(watched: Callable[..., Watched], plugin_dir: str) -> None:
    w = watched()
    plugin, registration = w.start_plugin("p.sock")
    w.kubelet.wait_until(serving(plugin.path))
    other = StubPlugin(plugin_dir, "other.sock")  # a device-plugins socket: wiped by the restart
    try:
        w.kubelet.restart()
        assert not os.path.exists(other.path) and os.path.exists(plugin.path)
        w.kubelet.wait_until(lambda k: len(w.attempts(plugin.path)) == 2 and serving(plugin.path)(k))
        assert registration.statuses == [(True, ""), (True, "")] and plugin.cancelled.wait(5)
        assert w.kubelet.deregistrations == []  # a new run starts from nothing; nothing to unregister
    finally:
        other.stop()


def test_a_stale_socket_is_retried_until_a_plugin_serves_there(watched: Callable[..., Watched], registry: str) -> None:
    path = os.path.join(registry, "p.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a SIGKILLed plugin's
    w = watched(dataclasses.replace(FAST_WATCHER, dial_timeout=0.2))
    w.kubelet.wait_until(lambda k: len(w.attempts(path)) >= 2)
    assert w.attempts(path)[0].error == (
        f"RegisterPlugin error -- dial failed at socket {path}, err: failed to dial socket {path}, "
        "err: context deadline exceeded"
    )
    os.unlink(path)
    plugin, _ = w.start_plugin("p.sock")
    w.kubelet.wait_until(serving(plugin.path))


def test_protocol_violations_of_the_watcher_route(watched: Callable[..., Watched], plugin_dir: str) -> None:
    w = watched()
    held = StubRegistration(plugin_info("example.com/slow"))
    held.hold.clear()  # GetInfo answers after its 1 s deadline
    slow = StubPlugin(w.registry, "slow.sock", registration=held)
    inside = StubPlugin(plugin_dir, "inside.sock")  # endpoint in device-plugins
    both, _ = w.start_plugin("both.sock", plugin_info("example.com/both"))
    w.start_plugin("inside-reg.sock", plugin_info("example.com/inside", endpoint=inside.path))
    try:
        w.kubelet.wait_until(lambda k: any(a.socket_path == slow.path for a in k.watcher_attempts))
        held.hold.set()
        w.kubelet.wait_until(w.notified(both.path))
        both.register(w.kubelet, "example.com/both")  # and on kubelet.sock too
        w.kubelet.wait_until(lambda k: len(k.violations) >= 3)
        assert sorted(w.kubelet.violations) == sorted(
            [
                f"plugin watcher: GetInfo at {slow.path} took more than 1 s",
                f"plugin watcher: example.com/inside's endpoint {inside.path} is in the device-plugin directory, "
                "which a kubelet restart wipes",
                "example.com/both: registered both on kubelet.sock and through the plugin watcher",
            ]
        )
        w.kubelet.violations.clear()  # seen; the fixture would fail the test on them
    finally:
        slow.stop()
        inside.stop()


def test_the_plugin_watcher_needs_e1(plugin_dir: str, registry: str) -> None:
    with pytest.raises(ValueError):
        FakeKubelet(plugin_dir, Mode.E2, registry_dir=registry)
