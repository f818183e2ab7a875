"""A fake kubelet device manager that talks to device plugins like the real one.

It follows ../shared/docs/kubelet-device-plugin-protocol.md: Register validation with the
kubelet's exact error texts, the 1.25+ blocking dial-back (Mode.E2) or the 1.20-1.24
answer-first dial-later (Mode.E1), one ListAndWatch stream per registration read with gRPC's
default 4 MiB limit, full-snapshot device sets, capacity/allocatable, admission through
GetPreferredAllocation + Allocate (+ PreStartContainer), and restarts that delete every socket
in the directory. Every protocol rule a plugin breaks is recorded in `violations`.
Tests and the node simulation wait on its state with `wait_until`, never on sleeps.
"""

import concurrent.futures
import dataclasses
import enum
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ["v1beta1"]
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DIAL_TIMEOUT_S = 10.0
PRE_START_TIMEOUT_S = 30.0
HEALTHY = "Healthy"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


class Mode(enum.Enum):
    E1 = "1.20-1.24: Register answers at once; dial and ListAndWatch follow in the background"
    E2 = "1.25+: Register dials back and calls GetDevicePluginOptions before it answers"


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


@dataclasses.dataclass
class Resource:
    """What the device manager knows of one extended resource."""

    endpoint: str = ""
    options: api_pb2.DevicePluginOptions | None = None
    healthy: set[str] = dataclasses.field(default_factory=set)
    unhealthy: set[str] = dataclasses.field(default_factory=set)
    snapshots: list[api_pb2.ListAndWatchResponse] = dataclasses.field(default_factory=list)
    channel: grpc.Channel | None = None
    connected: bool = False
    streams_opened: int = 0

    @property
    def capacity(self) -> int:
        return len(self.healthy | self.unhealthy)

    @property
    def allocatable(self) -> int:
        return len(self.healthy)


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


class FakeKubelet:
    """Serves Registration on <directory>/kubelet.sock and drives registered plugins."""

    def __init__(self, directory: str, mode: Mode = Mode.E2, *, e1_dial: threading.Event | None = None) -> None:
        self.directory = directory
        self.mode = mode
        self.supported_versions = list(SUPPORTED_VERSIONS)
        # E1 only: the background dial waits for this event (set = dial at once). Never setting
        # it models the silent E1 failure in which the plugin is never called back.
        self.e1_dial = e1_dial
        self.resources: dict[str, Resource] = {}
        self.allocations: list[Allocation] = []
        self.register_requests: list[api_pb2.RegisterRequest] = []
        self.register_times: list[float] = []  # time.monotonic() of each Register
        self.register_errors: list[str] = []
        self.violations: list[str] = []
        self.preferred_calls = 0
        self.prestart_calls = 0
        self.restarts = 0
        self._state = threading.Condition()
        self._server: grpc.Server | None = None

    # Life cycle ------------------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, KUBELET_SOCKET)

    def start(self) -> None:
        """Starts like the kubelet: delete every socket, then listen on kubelet.sock."""
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

    def stop(self) -> None:
        """Goes away like a dying kubelet: closes every plugin connection and its socket."""
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None
        with self._state:
            channels = [r.channel for r in self.resources.values() if r.channel is not None]
        for channel in channels:
            channel.close()

    def restart(self) -> None:
        """A kubelet restart: stop, then start (which deletes the plugins' sockets)."""
        self.stop()
        with self._state:
            self.restarts += 1
            for resource in self.resources.values():
                resource.options = None  # unknown until the plugin registers again
                self._disconnect(resource)
        self.start()

    def cancel_stream(self, resource: str) -> None:
        """Closes the connection to a plugin, which ends its ListAndWatch stream."""
        with self._state:
            state = self.resources[resource]
            channel = state.channel
            self._disconnect(state)  # the kubelet drops the endpoint before it closes the channel
        if channel is not None:
            channel.close()

    def _disconnect(self, resource: Resource) -> None:
        """Marks a resource's plugin gone: its devices turn unhealthy (allocatable 0)."""
        resource.unhealthy |= resource.healthy
        resource.healthy = set()
        resource.connected = False
        self._state.notify_all()

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
                f"streams {r.streams_opened}"
                for name, r in self.resources.items()
            )
            + f"; registrations {len(self.register_requests)}; errors {self.register_errors}"
            + f"; violations {self.violations}"
        )

    def resource(self, name: str) -> Resource:
        with self._state:
            return self.resources.setdefault(name, Resource())

    def allocatable(self, name: str) -> int:
        with self._state:
            return self.resources[name].allocatable if name in self.resources else 0

    def _changed(self) -> None:
        with self._state:
            self._state.notify_all()

    def _violation(self, text: str) -> None:
        with self._state:
            self.violations.append(text)
            self._state.notify_all()

    # Registration ----------------------------------------------------------------------------

    def _register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:
        with self._state:
            self.register_requests.append(request)
            self.register_times.append(time.monotonic())
            current = self.resources.get(request.resource_name)
            if current is not None and current.connected:
                # On 1.25-1.36 the old stream's later end disconnects the new registration.
                self.violations.append(f"{request.resource_name}: registered again while its stream is open")
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
        if self.mode is Mode.E1:
            threading.Thread(target=self._connect_e1, args=(request,), daemon=True).start()
            return api_pb2.Empty()
        try:
            channel, options = self._connect(request, authority="localhost")
        except grpc.FutureTimeoutError:
            self._refuse(context, "failed to dial device plugin: context deadline exceeded")
        except grpc.RpcError as error:
            self._refuse(context, f"failed to get device plugin options: {error.details()}")
        if request.options != options:
            self._violation(f"RegisterRequest.options {request.options} != GetDevicePluginOptions {options}")
        self._start_stream(request, channel, options)
        return api_pb2.Empty()

    def _refuse(self, context: grpc.ServicerContext, text: str) -> None:
        with self._state:
            self.register_errors.append(text)
            self._state.notify_all()
        context.abort(grpc.StatusCode.UNKNOWN, text)

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
        path = os.path.join(self.directory, request.endpoint)
        channel = grpc.insecure_channel(f"unix://{path}", options=[("grpc.default_authority", path)])
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            channel.close()  # E1 only logs this; the plugin is never told
            return
        self._start_stream(request, channel, request.options)

    def _start_stream(
        self, request: api_pb2.RegisterRequest, channel: grpc.Channel, options: api_pb2.DevicePluginOptions
    ) -> None:
        with self._state:
            resource = self.resources.setdefault(request.resource_name, Resource())
            resource.endpoint, resource.options, resource.channel = request.endpoint, options, channel
            resource.connected = True
            resource.streams_opened += 1
            self._state.notify_all()
        threading.Thread(target=self._read_stream, args=(request.resource_name, resource, channel), daemon=True).start()

    def _read_stream(self, name: str, resource: Resource, channel: grpc.Channel) -> None:
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            for snapshot in stub.ListAndWatch(api_pb2.Empty()):
                self._check_snapshot(name, snapshot)
                with self._state:
                    resource.snapshots.append(snapshot)
                    if resource.channel is channel:
                        resource.healthy = {d.ID for d in snapshot.devices if d.health == HEALTHY}
                        resource.unhealthy = {d.ID for d in snapshot.devices if d.health != HEALTHY}
                    self._state.notify_all()
            self._violation(f"{name}: ListAndWatch returned while registered")
        except grpc.RpcError:
            pass
        with self._state:
            if resource.channel is channel:  # only the current endpoint marks the resource down
                self._disconnect(resource)
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

    def Register(self, request, context):
        return self._kubelet._register(request, context)
