"""A fake kubelet device manager that talks to device plugins like the real one.

It follows ../shared/docs/kubelet-device-plugin-protocol.md: Register validation with the
kubelet's exact error texts, the 1.20-1.24 answer-first dial-later (Mode.E1) or the 1.25+
blocking dial-back (Mode.E2, Mode.E3), one ListAndWatch stream per registration read with
gRPC's default 4 MiB limit, full-snapshot device sets, capacity/allocatable and the node-status
view of them, admission through GetPreferredAllocation + Allocate (+ PreStartContainer), and
restarts that delete every socket in the directory. Every protocol rule a plugin breaks is
recorded in `violations`. Tests and the node simulation wait on its state with `wait_until`,
never on sleeps.

What each era does when two plugin instances register the same resource (protocol doc §8.2)
is modelled on the kubelet's own bookkeeping, not flagged:

* E1 (1.20-1.24, pkg/kubelet/cm/devicemanager/manager.go `registerEndpoint`, `runEndpoint`):
  one endpoint per resource name; a registration replaces it and leaves the old connection and
  stream alone. Every stream's snapshots update the resource's device sets. When a stream ends
  the kubelet closes that endpoint's connection and marks the resource unhealthy only if the
  endpoint is still the current one.
* E2 (1.25-1.36, plugin/v1beta1/handler.go `connectClient`, `runClient`): one client per
  resource name, stored before the dial-back. When a client's stream ends, the clean-up looks
  the client up *by name*, so the end of a replaced instance's stream disconnects the newest
  client (closes its connection, which cancels that plugin's ListAndWatch) and marks the
  resource unhealthy (kubernetes/kubernetes#121994, #127803). A failed Register deletes the
  name's entry, i.e. the previous working client's, whose later stream end is then not
  cleaned up at all.
* E3 (1.37+, PR #135437): clients are tracked per (resource name, socket path); the end of one
  instance's stream disconnects only that instance, and the resource is marked unhealthy only
  when its last instance goes. A Register naming a socket path that is still tracked is refused.

With `registry_dir` (Mode.E1 only), the fake also runs the 1.20 kubelet's plugin manager for
device plugins (protocol doc §7.6; `_PluginManager` below says which source each part follows):
sockets found in the registry directory are asked GetInfo, validated, and registered through the
device manager's watcher handler, whose endpoints share the E1 bookkeeping above.
"""

import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import itertools
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, NoReturn

import grpc
import inotify_simple

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pluginregistration.v1 import api_pb2 as registration_pb2
from pluginregistration.v1 import api_pb2_grpc as registration_pb2_grpc

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ["v1beta1"]
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DIAL_TIMEOUT_S = 10.0
PRE_START_TIMEOUT_S = 30.0
STOP_GRACE_PERIOD_S = 300.0  # endpointStopGracePeriod: a stopped resource leaves node status after 5 min
HEALTHY = "Healthy"
# How long a Register waits for the clean-up of connections the kubelet itself has just closed
# (see FakeKubelet._await_cleanups).
_CLEANUP_WAIT_S = 5.0

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

# The plugin watcher (1.20): pluginmanager/operationexecutor/operation_generator.go and
# plugin_manager.go, util/goroutinemap/exponentialbackoff.
DEVICE_PLUGIN_TYPE = "DevicePlugin"
GET_INFO_TIMEOUT_S = 1.0
NOTIFY_TIMEOUT_S = 5.0
RECONCILE_PERIOD_S = 1.0  # loopSleepDuration
BACKOFF_INITIAL_S = 0.5  # initialDurationBeforeRetry
BACKOFF_MAX_S = 122.0  # maxDurationBeforeRetry (2m2s)
# GetDevicePluginOptions has no deadline on this route (context.Background()); a bound keeps a
# broken test from hanging, far beyond the 1 s after which it is recorded as a violation.
_OPTIONS_TIMEOUT_S = 30.0
# inotify events the watcher reacts to: fsnotify maps CREATE and MOVED_TO to Create, DELETE and
# DELETE_SELF to Remove; MOVED_FROM is a Rename, which plugin_watcher.go ignores.
_WATCH_MASK = (
    inotify_simple.flags.CREATE
    | inotify_simple.flags.MOVED_TO
    | inotify_simple.flags.DELETE
    | inotify_simple.flags.DELETE_SELF
)


class Mode(enum.Enum):
    E1 = "1.20-1.24: Register answers at once; dial and ListAndWatch follow; one endpoint per resource"
    E2 = "1.25-1.36: Register dials back and calls GetDevicePluginOptions first; one client per resource name"
    E3 = "1.37+ (PR #135437): as E2, with plugin instances tracked per (resource, socket path)"


@dataclasses.dataclass(frozen=True)
class WatcherTiming:
    """The plugin manager's constants: the kubelet's own by default; tests shorten them."""

    reconcile_period: float = RECONCILE_PERIOD_S
    backoff_initial: float = BACKOFF_INITIAL_S
    backoff_max: float = BACKOFF_MAX_S
    dial_timeout: float = DIAL_TIMEOUT_S


# Short enough for tests to run in seconds, same shape as the kubelet's.
FAST_WATCHER = WatcherTiming(reconcile_period=0.05, backoff_initial=0.1, backoff_max=1.0, dial_timeout=2.0)


@dataclasses.dataclass(frozen=True)
class WatcherAttempt:
    """One RegisterPlugin operation of the plugin manager on a registry socket."""

    socket_path: str
    info: registration_pb2.PluginInfo | None  # GetInfo's answer, if there was one
    error: str | None  # the operation's error (it is retried if the plugin is not recorded), None: registered
    time: float  # time.monotonic() at the end


class Notification(NamedTuple):
    """A NotifyRegistrationStatus the kubelet sent."""

    socket_path: str
    registered: bool
    error: str


class AdmissionError(Exception):
    """The kubelet rejects the pod (UnexpectedAdmissionError)."""


def is_extended_resource_name(name: str) -> bool:
    """The kubelet's IsExtendedResourceName, written independently of the daemon's check."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    prefix, _, part = ("requests." + name).partition("/")
    return (
        "/" not in part
        and len(prefix) <= 253
        and all(_DNS_LABEL.fullmatch(label) for label in prefix.split("."))
        and len(part) <= 63
        and bool(_NAME_PART.fullmatch(part))
    )


def already_tracked_error(resource: str, socket_path: str) -> str:
    """E3's refusal of a Register whose socket path is still tracked for the resource. The text
    is ours: the sources seen (PR #135437 and its follow-up #139338) do not show the message."""
    return f'device plugin for resource "{resource}" is already registered with socket path {socket_path}'


class Registration(NamedTuple):
    """One Register call for a resource that passed the version and name checks."""

    endpoint: str
    time: float  # time.monotonic()


@dataclasses.dataclass(eq=False)
class Connection:
    """One plugin instance the kubelet dialled back: its endpoint (E1) or client (E2, E3)."""

    resource: str
    endpoint: str  # the socket file name from the RegisterRequest
    life: int  # which run of the kubelet made it; a stopped kubelet forgets its connections
    channel: grpc.Channel | None = None
    options: api_pb2.DevicePluginOptions | None = None
    stream_open: bool = False  # the kubelet's ListAndWatch call on it is running
    snapshots: int = 0  # ListAndWatch messages received on it
    closed_by_kubelet: bool = False  # the kubelet closed the connection (the plugin sees its stream cancelled)
    cleaned_up: bool = False  # the kubelet has handled the end of its stream


@dataclasses.dataclass
class Resource:
    """What the device manager knows of one extended resource."""

    # The device manager's endpoint for the resource (the newest registration; in E3 the newest
    # tracked instance). Allocation goes there; `endpoint`, `options` and `channel` are its.
    current: Connection | None = None
    endpoint: str = ""
    options: api_pb2.DevicePluginOptions | None = None
    channel: grpc.Channel | None = None
    healthy: set[str] = dataclasses.field(default_factory=set)
    unhealthy: set[str] = dataclasses.field(default_factory=set)
    snapshots: list[api_pb2.ListAndWatchResponse] = dataclasses.field(default_factory=list)
    connected: bool = False  # registered and not marked unhealthy since
    streams_opened: int = 0
    stopped_at: float | None = None  # when the current endpoint stopped (kubelet clock)
    # E2: the server's client map entry for the name (key ""); E3: tracked instances by socket
    # file name. Unused in E1, which has only `current`.
    clients: dict[str, Connection] = dataclasses.field(default_factory=dict)
    connections: list[Connection] = dataclasses.field(default_factory=list)  # every dial-back, oldest first
    registrations: list[Registration] = dataclasses.field(default_factory=list)
    # Times the kubelet marked the resource unhealthy (allocatable dropped from >0 to 0) because
    # a plugin connection went away; snapshots that report devices unhealthy do not count.
    unhealthy_marks: int = 0
    allocatable_history: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    @property
    def capacity(self) -> int:
        return len(self.healthy | self.unhealthy)

    @property
    def allocatable(self) -> int:
        return len(self.healthy)

    @property
    def open_streams(self) -> list[Connection]:
        return [c for c in self.connections if c.stream_open]


@dataclasses.dataclass(frozen=True)
class Allocation:
    pod: str
    container: str
    resource: str
    ids: tuple[str, ...]
    response: api_pb2.ContainerAllocateResponse


def advertising(resource: str, count: int, registrations: int | None = None) -> Callable[["FakeKubelet"], bool]:
    """A wait_until predicate: `resource` connected with `count` healthy devices and, if given,
    exactly `registrations` Register calls and ListAndWatch streams so far."""

    def predicate(kubelet: "FakeKubelet") -> bool:
        state = kubelet.resources.get(resource)
        return (
            state is not None
            and state.connected
            and state.allocatable == count
            and (registrations is None or len(kubelet.register_requests) == state.streams_opened == registrations)
        )

    return predicate


def newest_connection(kubelet: "FakeKubelet", resource: str, endpoint: str) -> "Connection":
    """The kubelet's newest connection to `endpoint` for `resource`."""
    return next(c for c in reversed(kubelet.resources[resource].connections) if c.endpoint == endpoint)


def serving_from(resource: str, endpoint: str, count: int) -> Callable[["FakeKubelet"], bool]:
    """A wait_until predicate: `endpoint` is `resource`'s current endpoint, has streamed, and
    `count` devices are allocatable."""

    def predicate(kubelet: "FakeKubelet") -> bool:
        state = kubelet.resources.get(resource)
        return (
            state is not None
            and state.connected
            and state.endpoint == endpoint
            and newest_connection(kubelet, resource, endpoint).snapshots > 0
            and state.allocatable == count
        )

    return predicate


def reconciler_passes(count: int) -> Callable[["FakeKubelet"], bool]:
    """A wait_until predicate: `count` more passes of the plugin watcher's reconciler from the
    first evaluation (to see that nothing more happens, e.g. no retry)."""
    target: list[int] = []

    def predicate(kubelet: "FakeKubelet") -> bool:
        if not target:
            target.append(kubelet.reconciles + count)
        return kubelet.reconciles >= target[0]

    return predicate


class FakeKubelet:
    """Serves Registration on <directory>/kubelet.sock and drives registered plugins."""

    def __init__(
        self,
        directory: str,
        mode: Mode = Mode.E2,
        *,
        e1_dial: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        grace_period: float = STOP_GRACE_PERIOD_S,
        registry_dir: str | None = None,
        watcher: WatcherTiming = WatcherTiming(),
    ) -> None:
        if registry_dir is not None and mode is not Mode.E1:
            raise ValueError("the plugin watcher is modelled on the 1.20 kubelet: use Mode.E1 with registry_dir")
        self.directory = directory
        self.mode = mode
        # The plugin watcher's directory (plugins_registry), or None for no plugin watcher.
        self.registry_dir = registry_dir
        self.watcher = watcher
        self.supported_versions = list(SUPPORTED_VERSIONS)
        # E1 only: the background dial waits for this event (set = dial at once). Never setting
        # it models the silent E1 failure in which the plugin is never called back.
        self.e1_dial = e1_dial
        self.clock = clock  # for stop times and node status only
        self.grace_period = grace_period
        self.resources: dict[str, Resource] = {}
        self.allocations: list[Allocation] = []
        self.register_requests: list[api_pb2.RegisterRequest] = []
        self.register_times: list[float] = []  # time.monotonic() of each Register
        self.register_errors: list[str] = []
        self.violations: list[str] = []
        self.preferred_calls = 0
        self.prestart_calls = 0
        self.restarts = 0
        # The plugin watcher: every RegisterPlugin operation, NotifyRegistrationStatus sent,
        # and DeRegisterPlugin as (socket path, resource name).
        self.watcher_attempts: list[WatcherAttempt] = []
        self.notifications: list[Notification] = []
        self.deregistrations: list[tuple[str, str]] = []
        self.reconciles = 0  # passes of the plugin manager's reconciler (to wait for "nothing happened")
        self._register_plugin_failures: list[str | None] = []
        self._routes: dict[str, set[str]] = {}  # resource -> routes it registered by, this run
        self._plugin_manager: _PluginManager | None = None
        self._state = threading.Condition()
        self._server: grpc.Server | None = None
        self._life = 0  # bumped when the kubelet stops: the new run ignores the old run's streams

    # Life cycle ------------------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, KUBELET_SOCKET)

    def start(self) -> None:
        """Starts like the kubelet: delete every socket, then listen on kubelet.sock; then, with
        a registry directory, the plugin manager (which never deletes anything there)."""
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name != CHECKPOINT and stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        api_pb2_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server
        if self.registry_dir is not None:
            with self._state:
                self._routes.clear()
            self._plugin_manager = _PluginManager(self, self.registry_dir, self.watcher)
            self._plugin_manager.start()

    def stop(self) -> None:
        """Goes away like a dying kubelet: closes every plugin connection and its socket."""
        if self._plugin_manager is not None:
            self._plugin_manager.stop()
            self._plugin_manager = None
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None
        with self._state:
            self._life += 1
            channels = []
            for resource in self.resources.values():
                for connection in resource.connections:
                    if connection.channel is not None and not connection.closed_by_kubelet:
                        connection.closed_by_kubelet = True
                        channels.append(connection.channel)
        for channel in channels:
            channel.close()

    def restart(self) -> None:
        """A kubelet restart: stop, then start (which deletes the plugins' sockets, but not the
        registry's: the new plugin manager registers those again by itself). The new kubelet
        knows the resources from its checkpoint only: stopped endpoints, no devices, options
        unknown until the plugin registers again (§7.5)."""
        self.stop()
        with self._state:
            self.restarts += 1
            now = self.clock()
            for resource in self.resources.values():
                resource.current, resource.channel, resource.options = None, None, None
                resource.clients.clear()
                resource.healthy, resource.unhealthy = set(), set()
                resource.connected = False
                resource.stopped_at = now
                self._note_allocatable(resource)
            self._state.notify_all()
        self.start()

    def cancel_stream(self, resource: str, endpoint: str | None = None) -> None:
        """The kubelet drops a plugin connection (by default the resource's current one), which
        ends its ListAndWatch stream: E1 stops the endpoint, E2 and E3 disconnect the client."""
        with self._state:
            state = self.resources[resource]
            if endpoint is None:
                connection = state.current
            else:
                connection = next(c for c in reversed(state.connections) if c.endpoint == endpoint)
            if connection is None:
                return
            if self.mode is Mode.E1:
                channels = self._close(connection)
                if state.current is connection:
                    self._mark_unhealthy(state)
            elif connection in state.clients.values():
                channels = self._disconnect_client(state, connection)
            else:
                channels = self._close(connection)
            self._state.notify_all()
        for channel in channels:
            channel.close()

    # State -------------------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[["FakeKubelet"], bool], timeout: float = 10.0) -> None:
        """Blocks until predicate(self) holds; raises TimeoutError with what was seen."""
        deadline = time.monotonic() + timeout
        with self._state:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fake kubelet state not reached in {timeout} s: {self.describe()}")
                self._state.wait(remaining)

    def describe(self) -> str:
        return (
            ", ".join(
                f"{name}: capacity {r.capacity} allocatable {r.allocatable} connected {r.connected} "
                f"streams {r.streams_opened} open {[c.endpoint for c in r.open_streams]} "
                f"current {r.endpoint or None} unhealthy marks {r.unhealthy_marks}"
                for name, r in self.resources.items()
            )
            + f"; registrations {len(self.register_requests)}; errors {self.register_errors}"
            + (
                f"; plugin watcher: registered {self.registered_plugins()}, "
                f"attempts {len(self.watcher_attempts)}, notifications {self.notifications}, "
                f"deregistrations {self.deregistrations}"
                if self.registry_dir is not None
                else ""
            )
            + f"; violations {self.violations}"
        )

    def registered_plugins(self) -> dict[str, str]:
        """The plugin manager's actual state of the world: {registry socket path: resource}."""
        manager = self._plugin_manager
        return manager.registered() if manager is not None else {}

    def fail_register_plugin(self, times: int = 1, error: str | None = None) -> None:
        """Test hook: the next `times` RegisterPlugin calls of the watcher handler fail, after the
        plugin passed validation, with `error` (default: the dial of its endpoint timing out),
        without dialling. The kubelet then notifies the failure and never retries
        (kubernetes#127457)."""
        with self._state:
            self._register_plugin_failures += [error] * times

    def resource(self, name: str) -> Resource:
        with self._state:
            return self.resources.setdefault(name, Resource())

    def allocatable(self, name: str) -> int:
        with self._state:
            return self.resources[name].allocatable if name in self.resources else 0

    def node_status(self) -> dict[str, tuple[int, int]]:
        """{resource: (capacity, allocatable)} as the kubelet's next node-status sync writes them
        (GetCapacity, §3.7, §3.10): healthy + unhealthy and healthy devices; a resource whose
        endpoint stopped more than `grace_period` ago is dropped and written as an explicit 0."""
        now = self.clock()
        with self._state:
            status = {}
            for name, r in self.resources.items():
                expired = r.stopped_at is not None and now - r.stopped_at > self.grace_period
                status[name] = (0, 0) if expired else (r.capacity, r.allocatable)
            return status

    def node_allocatable(self, name: str) -> int:
        return self.node_status().get(name, (0, 0))[1]

    def _changed(self) -> None:
        with self._state:
            self._state.notify_all()

    def _violation(self, text: str) -> None:
        with self._state:
            self.violations.append(text)
            self._state.notify_all()

    def _note_allocatable(self, resource: Resource) -> None:
        if not resource.allocatable_history or resource.allocatable_history[-1][1] != resource.allocatable:
            resource.allocatable_history.append((time.monotonic(), resource.allocatable))

    # Registration ----------------------------------------------------------------------------

    def _register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:
        with self._state:
            self.register_requests.append(request)
            self.register_times.append(time.monotonic())
            self._state.notify_all()
        if request.version not in self.supported_versions:
            supported = "[" + " ".join(f'"{v}"' for v in self.supported_versions) + "]"
            self._refuse(
                context,
                f'requested API version "{request.version}" is not supported by kubelet. '
                f"Supported version is {supported}",
            )
        if not is_extended_resource_name(request.resource_name):
            self._refuse(context, f'the ResourceName "{request.resource_name}" is invalid')
        if not request.endpoint or "/" in request.endpoint:
            self._violation(f"endpoint {request.endpoint!r} is not a bare file name")
        name = request.resource_name
        self._note_route(name, KUBELET_SOCKET)
        with self._state:
            resource = self.resources.setdefault(name, Resource())
            resource.registrations.append(Registration(request.endpoint, time.monotonic()))
            self._state.notify_all()
        if self.mode is Mode.E1:
            threading.Thread(target=self._connect_e1, args=(request,), daemon=True).start()
            return api_pb2.Empty()
        self._await_cleanups(resource)
        with self._state:
            # The client is stored before the dial-back (handler.go connectClient): E2 by name,
            # replacing the previous client without closing it; E3 per socket path.
            key = request.endpoint if self.mode is Mode.E3 else ""
            tracked = self.mode is Mode.E3 and key in resource.clients
            connection = Connection(name, request.endpoint, self._life)
            if not tracked:
                resource.clients[key] = connection
        if tracked:
            self._refuse(context, already_tracked_error(name, os.path.join(self.directory, request.endpoint)))
        try:
            channel, options = self._connect(request, authority="localhost")
        except (grpc.FutureTimeoutError, grpc.RpcError) as error:
            with self._state:
                # E2 deletes whatever the name's entry is now: the previous working client was
                # replaced above, so it is forgotten too. E3 deletes this instance only.
                if self.mode is Mode.E2 or resource.clients.get(key) is connection:
                    resource.clients.pop(key, None)
                self._state.notify_all()
            if isinstance(error, grpc.FutureTimeoutError):
                self._refuse(context, "failed to dial device plugin: context deadline exceeded")
            self._refuse(context, f"failed to get device plugin options: {error.details()}")
        if request.options != options:
            self._violation(f"RegisterRequest.options {request.options} != GetDevicePluginOptions {options}")
        self._start_stream(resource, connection, channel, options)
        return api_pb2.Empty()

    def _refuse(self, context: grpc.ServicerContext, text: str) -> NoReturn:
        with self._state:
            self.register_errors.append(text)
            self._state.notify_all()
        context.abort(grpc.StatusCode.UNKNOWN, text)

    def _await_cleanups(self, resource: Resource) -> None:
        """Waits until the kubelet has handled the end of every stream it closed itself.

        When the kubelet closes a connection, its goroutine reading that stream wakes at once and
        runs the clean-up long before the plugin, which only then sees its stream cancelled, can
        register again and be dialled back. Here both are threads, so a Register waits for those
        clean-ups to keep that order."""
        with self._state:
            self._state.wait_for(
                lambda: all(c.cleaned_up for c in resource.connections if c.closed_by_kubelet and c.stream_open),
                timeout=_CLEANUP_WAIT_S,
            )

    def _connect(
        self, request: api_pb2.RegisterRequest, authority: str
    ) -> tuple[grpc.Channel, api_pb2.DevicePluginOptions]:
        path = os.path.join(self.directory, request.endpoint)
        channel = grpc.insecure_channel(f"unix://{path}", options=[("grpc.default_authority", authority)])
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT_S)
            started = time.monotonic()
            options = api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api_pb2.Empty())
            if time.monotonic() - started > 1.0:
                self._violation("GetDevicePluginOptions took more than 1 s")
        except Exception:
            channel.close()
            raise
        return channel, options

    def _connect_e1(self, request: api_pb2.RegisterRequest) -> None:
        if self.e1_dial is not None:
            self.e1_dial.wait()
        resource = self.resource(request.resource_name)
        self._await_cleanups(resource)
        path = os.path.join(self.directory, request.endpoint)
        channel = grpc.insecure_channel(f"unix://{path}", options=[("grpc.default_authority", path)])
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            channel.close()  # E1 only logs this; the plugin is never told
            return
        connection = Connection(request.resource_name, request.endpoint, self._life)
        self._start_stream(resource, connection, channel, request.options)

    def _start_stream(
        self,
        resource: Resource,
        connection: Connection,
        channel: grpc.Channel,
        options: api_pb2.DevicePluginOptions,
        same_life: bool = False,
    ) -> bool:
        """The registration succeeded: the connection becomes the resource's endpoint. With
        `same_life`, False (and the channel closed) if the kubelet that made it has stopped."""
        with self._state:
            if same_life and connection.life != self._life:
                channel.close()
                return False
            connection.channel, connection.options, connection.stream_open = channel, options, True
            resource.connections.append(connection)
            self._make_current(resource, connection)
            resource.streams_opened += 1
            self._state.notify_all()
        threading.Thread(target=self._read_stream, args=(resource, connection), daemon=True).start()
        return True

    def _make_current(self, resource: Resource, connection: Connection) -> None:
        resource.current = connection
        resource.endpoint = connection.endpoint
        resource.options = connection.options
        resource.channel = connection.channel
        resource.connected = True
        resource.stopped_at = None

    def _read_stream(self, resource: Resource, connection: Connection) -> None:
        name = connection.resource
        assert connection.channel is not None
        stub = api_pb2_grpc.DevicePluginStub(connection.channel)
        try:
            for snapshot in stub.ListAndWatch(api_pb2.Empty()):
                self._check_snapshot(name, snapshot)
                with self._state:
                    # Every stream feeds the resource's sets, whichever instance it comes from
                    # (E1 genericDeviceUpdateCallback, E2 PluginListAndWatchReceiver: by name).
                    resource.snapshots.append(snapshot)
                    connection.snapshots += 1
                    if connection.life == self._life:
                        resource.healthy = {d.ID for d in snapshot.devices if d.health == HEALTHY}
                        resource.unhealthy = {d.ID for d in snapshot.devices if d.health != HEALTHY}
                        self._note_allocatable(resource)
                    self._state.notify_all()
            self._violation(f"{name}: ListAndWatch returned while registered")
        except grpc.RpcError:
            pass
        with self._state:
            channels = self._stream_ended(resource, connection) if connection.life == self._life else []
            connection.stream_open = False
            connection.cleaned_up = True
            self._state.notify_all()
        for channel in channels:
            channel.close()

    def _stream_ended(self, resource: Resource, connection: Connection) -> list[grpc.Channel]:
        """The kubelet's clean-up after a ListAndWatch stream ended; returns channels to close."""
        if self.mode is Mode.E1:
            # runEndpoint: stop() closes this endpoint's own connection; only the current
            # endpoint's end marks the resource unhealthy.
            channels = self._close(connection)
            if resource.current is connection:
                self._mark_unhealthy(resource)
            return channels
        # runClient: look the client up again, by name (E2) or by (name, socket path) (E3).
        client = resource.clients.get("" if self.mode is Mode.E2 else connection.endpoint)
        if client is None:
            return []
        return self._disconnect_client(resource, client)

    def _disconnect_client(self, resource: Resource, client: Connection) -> list[grpc.Channel]:
        """disconnectClient: forget the client, close its connection, then PluginDisconnected."""
        key = next(k for k, c in resource.clients.items() if c is client)
        del resource.clients[key]
        channels = self._close(client)
        if self.mode is Mode.E2:
            if resource.current is not None:
                self._mark_unhealthy(resource)
        elif not resource.clients:
            self._mark_unhealthy(resource)
        elif resource.current is client:
            # Allocation moves to the newest instance still tracked (partly verified, §8.2).
            live = [c for c in resource.connections if c in resource.clients.values()]
            if live:
                self._make_current(resource, live[-1])
        return channels

    def _close(self, connection: Connection) -> list[grpc.Channel]:
        if connection.channel is None or connection.closed_by_kubelet:
            return []
        connection.closed_by_kubelet = True
        return [connection.channel]

    def _mark_unhealthy(self, resource: Resource) -> None:
        """markResourceUnhealthy plus the endpoint's stop time: allocatable drops to 0."""
        if resource.healthy:
            resource.unhealthy_marks += 1
        resource.unhealthy |= resource.healthy
        resource.healthy = set()
        resource.connected = False
        resource.stopped_at = self.clock()
        self._note_allocatable(resource)
        self._state.notify_all()

    def _check_snapshot(self, name: str, snapshot: api_pb2.ListAndWatchResponse) -> None:
        ids = [d.ID for d in snapshot.devices]
        if snapshot.ByteSize() > MAX_MESSAGE_BYTES:
            self._violation(f"{name}: snapshot of {snapshot.ByteSize()} bytes exceeds 4 MiB")
        if len(set(ids)) != len(ids):
            self._violation(f"{name}: duplicate device IDs in a snapshot")
        if any(len(i) > 63 for i in ids):
            self._violation(f"{name}: a device ID is longer than 63 characters")
        if any(d.health not in ("Healthy", "Unhealthy") for d in snapshot.devices):
            self._violation(f"{name}: a device health is neither Healthy nor Unhealthy")

    # The device manager's plugin-watcher handler (1.20 manager.go) -----------------------------

    def _note_route(self, name: str, route: str) -> None:
        """Checklist 36: one registration route per resource, never both."""
        if self.registry_dir is None:
            return
        with self._state:
            routes = self._routes.setdefault(name, set())
            if route not in routes and routes:
                self.violations.append(f"{name}: registered both on kubelet.sock and through the plugin watcher")
                self._state.notify_all()
            routes.add(route)

    def _validate_plugin(self, name: str, endpoint: str, versions: list[str]) -> str | None:
        """ValidatePlugin: the error text, or None."""
        if not set(versions) & set(self.supported_versions):
            listed = " ".join(versions)
            return f"manager version, {SUPPORTED_VERSIONS[0]}, is not among plugin supported versions [{listed}]"
        if not is_extended_resource_name(name):
            return f'invalid name of device plugin socket: the ResourceName "{name}" is invalid'
        return None

    def _register_plugin(self, name: str, endpoint: str, life: int) -> str | None:
        """RegisterPlugin: dial the endpoint (10 s), GetDevicePluginOptions, registerEndpoint and
        runEndpoint as in E1 (so the resource goes unhealthy when the current endpoint's stream
        ends). The error text, or None."""
        self._note_route(name, "plugin watcher")
        resource = self.resource(name)
        dial_failed = (
            f"failed to dial device plugin with socketPath {endpoint}: "
            "failed to dial device plugin: context deadline exceeded"
        )
        with self._state:
            resource.registrations.append(Registration(endpoint, time.monotonic()))
            injected = bool(self._register_plugin_failures)
            injected_error = self._register_plugin_failures.pop(0) if injected else None
            self._state.notify_all()
        if injected:
            return injected_error or dial_failed
        self._await_cleanups(resource)  # as in E1: a closed endpoint is cleaned up before the next
        channel = grpc.insecure_channel(f"unix://{endpoint}", options=[("grpc.default_authority", endpoint)])
        try:
            grpc.channel_ready_future(channel).result(timeout=self.watcher.dial_timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            return dial_failed
        started = time.monotonic()
        try:
            options = api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                api_pb2.Empty(), timeout=_OPTIONS_TIMEOUT_S
            )
        except grpc.RpcError as error:
            channel.close()
            return f"failed to get device plugin options: {_go_error(error)}"
        if time.monotonic() - started > 1.0:
            self._violation("GetDevicePluginOptions took more than 1 s")
        if not self._start_stream(resource, Connection(name, endpoint, life), channel, options, same_life=True):
            return "the kubelet stopped"
        return None

    def _deregister_plugin(self, name: str, socket_path: str) -> None:
        """DeRegisterPlugin(name): stops the resource's current endpoint, whichever socket it
        came from (keyed by name); its runEndpoint then marks the resource unhealthy."""
        with self._state:
            self.deregistrations.append((socket_path, name))
            resource = self.resources.get(name)
            channels: list[grpc.Channel] = []
            if resource is not None and resource.current is not None:
                channels = self._close(resource.current)
                if not channels:
                    resource.stopped_at = self.clock()  # e.stop() stamps the stop time again
            self._state.notify_all()
        for channel in channels:
            channel.close()

    # Admission ---------------------------------------------------------------------------------

    def admit(self, pod: str, container: str, resource_name: str, count: int) -> Allocation:
        """Admits one container asking for `count` devices, as the kubelet's device manager."""
        with self._state:
            resource = self.resources.get(resource_name)
            if resource is None or resource.options is None or resource.channel is None:
                raise AdmissionError(f"cannot allocate unregistered device {resource_name}")
            if not resource.healthy:
                raise AdmissionError(f"no healthy devices present; cannot allocate unhealthy devices {resource_name}")
            busy = {i for a in self.allocations if a.resource == resource_name for i in a.ids}
            free = sorted(resource.healthy - busy)
            options, channel = resource.options, resource.channel
        if len(free) < count:
            raise AdmissionError(
                f"requested number of devices unavailable for {resource_name}. "
                f"Requested: {count}, Available: {len(free)}"
            )
        stub = api_pb2_grpc.DevicePluginStub(channel)
        chosen = self._choose(stub, options, free, count)
        try:
            response = stub.Allocate(
                api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=chosen)])
            )
        except grpc.RpcError as error:
            raise AdmissionError(
                f"Allocate failed due to rpc error: code = {error.code().name} desc = {error.details()}, "
                "which is unexpected"
            ) from None
        if not response.container_responses:
            raise AdmissionError("no containers return in allocation response")
        self._check_allocate_response(response)
        if options.pre_start_required:
            with self._state:
                self.prestart_calls += 1
            stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=chosen), timeout=PRE_START_TIMEOUT_S)
        allocation = Allocation(pod, container, resource_name, tuple(chosen), response.container_responses[0])
        with self._state:
            self.allocations.append(allocation)
            self._state.notify_all()
        return allocation

    def _choose(
        self, stub: api_pb2_grpc.DevicePluginStub, options: api_pb2.DevicePluginOptions, free: list[str], count: int
    ) -> list[str]:
        if not options.get_preferred_allocation_available:
            return free[:count]
        with self._state:
            self.preferred_calls += 1
        try:
            answer = stub.GetPreferredAllocation(
                api_pb2.PreferredAllocationRequest(
                    container_requests=[
                        api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=free, allocation_size=count)
                    ]
                )
            )
        except grpc.RpcError as error:
            raise AdmissionError(
                f"device plugin GetPreferredAllocation rpc failed with err: {error.details()}"
            ) from None
        preferred = list(answer.container_responses[0].deviceIDs) if answer.container_responses else []
        if len(preferred) != count or len(set(preferred)) != count or not set(preferred) <= set(free):
            self._violation(f"GetPreferredAllocation answered {preferred} for {count} of {free}")
        chosen = [i for i in preferred if i in set(free)][:count]
        return chosen + [i for i in free if i not in chosen][: count - len(chosen)]

    def _check_allocate_response(self, response: api_pb2.AllocateResponse) -> None:
        if response.ByteSize() > MAX_MESSAGE_BYTES:
            self._violation("Allocate response exceeds 4 MiB")
        for container in response.container_responses:
            for key in container.envs:
                if not _ENV_NAME.fullmatch(key):
                    self._violation(f"Allocate: invalid environment variable name {key!r}")
            for mount in container.mounts:
                if not (os.path.isabs(mount.container_path) and os.path.isabs(mount.host_path)):
                    self._violation(f"Allocate: mount paths must be absolute: {mount}")
            for device in container.devices:
                if not device.permissions or set(device.permissions) - set("rwm"):
                    self._violation(f"Allocate: bad device permissions {device.permissions!r}")

    def release(self, pods: Iterable[str]) -> None:
        """The pods ended: their devices are free again (the plugin is not told)."""
        ended = set(pods)
        with self._state:
            self.allocations = [a for a in self.allocations if a.pod not in ended]
            self._state.notify_all()


class _Registration(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._kubelet = kubelet

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:
        return self._kubelet._register(request, context)


def _go_error(error: grpc.RpcError) -> str:
    """A gRPC error as the kubelet (Go) prints it."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = "context deadline exceeded"
    name = "".join(part.capitalize() for part in code.name.split("_")) if code is not grpc.StatusCode.OK else "OK"
    return f"rpc error: code = {name} desc = {details}"


@dataclasses.dataclass
class _Operation:
    """goroutinemap's entry for one socket path: one operation at a time, exponential back-off
    after a failed one (exponentialbackoff.go); a successful one removes the entry."""

    pending: bool = True
    delay: float = 0.0
    failed_at: float = 0.0


class _PluginManager:
    """One run of the 1.20 kubelet's plugin manager for the registry directory.

    * pluginwatcher/plugin_watcher.go: creates the directory, watches it with inotify (and every
      subdirectory, found at start or created later), walks it at start and treats each socket
      found as created. Create (CREATE, MOVED_TO) of a socket whose name does not start with "."
      adds it to the desired state with a new timestamp; Remove (DELETE) removes it; other files
      and MOVED_FROM are ignored.
    * reconciler/reconciler.go: every `reconcile_period` (1 s), unregisters the plugins in the
      actual state that are no longer desired or whose timestamp changed (a re-created socket),
      then registers each desired plugin not in the actual state with its timestamp.
    * operationexecutor: one operation per socket path at a time; a failed one blocks the next
      for 0.5 s, doubling to 2m2s. RegisterPlugin (operation_generator.go): dial (10 s),
      GetInfo (1 s), handler by type, ValidatePlugin, then the plugin is added to the actual
      state *before* the handler's RegisterPlugin, so a failure there is notified but never
      retried (kubernetes#127457); success is notified (5 s deadline). UnregisterPlugin removes
      it from the actual state and calls DeRegisterPlugin(name).
    """

    def __init__(self, kubelet: FakeKubelet, directory: str, timing: WatcherTiming) -> None:
        self._kubelet = kubelet
        self.directory = directory
        self._timing = timing
        self._life = kubelet._life
        self._lock = threading.Lock()
        self._desired: dict[str, int] = {}  # socket path -> timestamp
        self._actual: dict[str, tuple[int, str]] = {}  # socket path -> (timestamp, resource name)
        self._operations: dict[str, _Operation] = {}
        self._timestamps = itertools.count(1)
        self._stopped = threading.Event()
        self._inotify = inotify_simple.INotify()
        self._watched: dict[int, str] = {}  # watch descriptor -> directory
        self._wake_read, self._wake_write = os.pipe()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        self._traverse(self.directory)
        for target, name in ((self._watch, "plugin-watcher"), (self._reconcile_loop, "plugin-reconciler")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """The kubelet dies: the watcher and the reconciler stop; operations in flight see it and
        give up, and the next run starts from an empty state."""
        self._stopped.set()
        os.write(self._wake_write, b"x")
        for thread in self._threads:
            thread.join()
        self._inotify.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def registered(self) -> dict[str, str]:
        with self._lock:
            return {path: name for path, (_, name) in self._actual.items()}

    # The watcher ------------------------------------------------------------------------------

    def _traverse(self, directory: str) -> None:
        """traversePluginDir: watch the directory, then its subdirectories and sockets."""
        try:
            self._watched[self._inotify.add_watch(directory, _WATCH_MASK)] = directory
        except OSError:
            return
        for root, dirs, files in os.walk(directory):
            for name in sorted(dirs):
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    self._watched[self._inotify.add_watch(path, _WATCH_MASK)] = path
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    is_socket = stat.S_ISSOCK(os.lstat(path).st_mode)
                except OSError:
                    continue
                if is_socket:
                    self._created(path)

    def _created(self, path: str) -> None:
        """handleCreateEvent."""
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return  # gone already
        if os.path.basename(path).startswith("."):
            return
        if stat.S_ISDIR(mode):
            self._traverse(path)
        elif stat.S_ISSOCK(mode):
            with self._lock:
                self._desired[path] = next(self._timestamps)

    def _watch(self) -> None:
        while not self._stopped.is_set():
            ready, _, _ = select.select([self._inotify.fd, self._wake_read], [], [])
            if self._wake_read in ready:
                return
            for event in self._inotify.read(timeout=0):
                directory = self._watched.get(event.wd)
                if directory is None or event.mask & inotify_simple.flags.IGNORED:
                    continue
                path = os.path.join(directory, event.name) if event.name else directory
                if event.mask & (inotify_simple.flags.CREATE | inotify_simple.flags.MOVED_TO):
                    self._created(path)
                elif event.mask & (inotify_simple.flags.DELETE | inotify_simple.flags.DELETE_SELF):
                    with self._lock:
                        self._desired.pop(path, None)

    # The reconciler ---------------------------------------------------------------------------

    def _reconcile_loop(self) -> None:
        while True:
            self._reconcile()
            if self._stopped.wait(self._timing.reconcile_period):
                return

    def _reconcile(self) -> None:
        kubelet = self._kubelet
        with kubelet._state:
            kubelet.reconciles += 1
            kubelet._state.notify_all()
        with self._lock:
            for path, (timestamp, name) in list(self._actual.items()):
                if self._desired.get(path) != timestamp:
                    self._run(path, functools.partial(self._unregister, path, name))
            for path, timestamp in list(self._desired.items()):
                if path not in self._actual or self._actual[path][0] != timestamp:
                    self._run(path, functools.partial(self._register, path, timestamp))

    def _run(self, path: str, operation: Callable[[], str | None]) -> None:
        """goroutinemap Run, under self._lock."""
        existing = self._operations.get(path)
        if existing is not None:
            if existing.pending or time.monotonic() - existing.failed_at <= existing.delay:
                return
            existing.pending = True
        else:
            self._operations[path] = _Operation()
        threading.Thread(target=self._complete, args=(path, operation), daemon=True).start()

    def _complete(self, path: str, operation: Callable[[], str | None]) -> None:
        error = operation()
        with self._lock:
            entry = self._operations[path]
            if error is None:
                del self._operations[path]
                return
            entry.delay = (
                self._timing.backoff_initial if entry.delay == 0 else min(2 * entry.delay, self._timing.backoff_max)
            )
            entry.failed_at = time.monotonic()
            entry.pending = False

    def _unregister(self, path: str, name: str) -> str | None:
        with self._lock:
            self._actual.pop(path, None)
        if self._stopped.is_set():
            return None
        self._kubelet._deregister_plugin(name, path)
        return None

    def _register(self, path: str, timestamp: int) -> str | None:
        """GenerateRegisterPluginFunc: the operation's error, or None."""
        kubelet = self._kubelet
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=self._timing.dial_timeout)
            except grpc.FutureTimeoutError:
                return self._record(
                    path,
                    None,
                    f"RegisterPlugin error -- dial failed at socket {path}, err: failed to dial socket {path}, "
                    "err: context deadline exceeded",
                )
            if self._stopped.is_set():
                return "the kubelet stopped"
            stub = registration_pb2_grpc.RegistrationStub(channel)
            try:
                info = stub.GetInfo(registration_pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT_S)
            except grpc.RpcError as error:
                if isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    kubelet._violation(f"plugin watcher: GetInfo at {path} took more than {GET_INFO_TIMEOUT_S:.0f} s")
                return self._record(
                    path,
                    None,
                    f"RegisterPlugin error -- failed to get plugin info using RPC GetInfo at socket {path}, "
                    f"err: {_go_error(error)}",
                )
            if self._stopped.is_set():
                return "the kubelet stopped"
            if info.type != DEVICE_PLUGIN_TYPE:
                text = f"RegisterPlugin error -- no handler registered for plugin type: {info.type} at socket {path}"
                return self._record(path, info, self._notify(stub, path, False, text) or text)
            endpoint = info.endpoint or path
            if not os.path.isabs(endpoint):
                kubelet._violation(f"plugin watcher: {info.name}'s endpoint {endpoint!r} is not an absolute path")
            elif os.path.commonpath([endpoint, kubelet.directory]) == kubelet.directory:
                kubelet._violation(
                    f"plugin watcher: {info.name}'s endpoint {endpoint} is in the device-plugin directory, "
                    "which a kubelet restart wipes"
                )
            invalid = kubelet._validate_plugin(info.name, endpoint, list(info.supported_versions))
            if invalid is not None:
                text = f"RegisterPlugin error -- plugin validation failed with err: {invalid}"
                failed = self._notify(stub, path, False, text)
                return self._record(
                    path, info, failed or "RegisterPlugin error -- pluginHandler.ValidatePluginFunc failed"
                )
            # Recorded before the handler's RegisterPlugin: from here on, the reconciler does not
            # try this socket again unless it is re-created.
            with self._lock:
                if self._stopped.is_set():
                    return "the kubelet stopped"
                self._actual[path] = (timestamp, info.name)
            refused = kubelet._register_plugin(info.name, endpoint, self._life)
            if refused is not None:
                text = f"RegisterPlugin error -- plugin registration failed with err: {refused}"
                return self._record(path, info, self._notify(stub, path, False, text) or text)
            failed = self._notify(stub, path, True, "")
            return self._record(
                path,
                info,
                failed
                and f"RegisterPlugin error -- failed to send registration status at socket {path}, err: {failed}",
            )
        finally:
            channel.close()

    def _notify(
        self, stub: registration_pb2_grpc.RegistrationStub, path: str, registered: bool, error: str
    ) -> str | None:
        """notifyPlugin: None if the plugin was told, else why not."""
        if self._stopped.is_set():
            return "the kubelet stopped"
        failed = None
        try:
            stub.NotifyRegistrationStatus(
                registration_pb2.RegistrationStatus(plugin_registered=registered, error=error),
                timeout=NOTIFY_TIMEOUT_S,
            )
        except grpc.RpcError as failure:
            failed = f"{error}: {_go_error(failure)}" if error else _go_error(failure)
        kubelet = self._kubelet
        with kubelet._state:  # once the call is over: the plugin has had it, if it could
            kubelet.notifications.append(Notification(path, registered, error))
            kubelet._state.notify_all()
        return failed

    def _record(self, path: str, info: registration_pb2.PluginInfo | None, error: str | None) -> str | None:
        kubelet = self._kubelet
        with kubelet._state:
            kubelet.watcher_attempts.append(WatcherAttempt(path, info, error, time.monotonic()))
            kubelet._state.notify_all()
        return error
