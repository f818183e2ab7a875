"""Talking to the kubelet: where a plugin's socket goes, the Register call, and what the
device-plugin directory's events mean.

Nothing here knows what the plugin serves. The kubelet signals a restart only by deleting the
plugin sockets and creating a new kubelet.sock (or by closing its connections), so the
directory is watched and each event is classified as a `DirectoryEvent`.
"""

import dataclasses
import enum
import os
import re

import grpc

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from token_resource import watch

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
# The kubelet (1.25+) dials back and calls GetDevicePluginOptions before it answers, allowing
# itself 10 s for the dial: wait well beyond that.
REGISTER_TIMEOUT_S = 30.0
# An instance number is a start time in nanoseconds: 19 digits until the year 2286.
INSTANCE_DIGITS = 19

DIRECTORY_MASK = watch.flags.CREATE | watch.flags.DELETE | watch.flags.MOVED_FROM | watch.flags.MOVED_TO | watch.GONE


class Registration(enum.Enum):
    KUBELET = "kubelet"  # Register on kubelet.sock
    PLUGIN_WATCHER = "plugin_watcher"  # a socket in plugins_registry that the kubelet finds


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where one resource is served, and how the kubelet learns of it.

    With Registration.KUBELET the socket is in the device-plugin directory. With `per_instance`,
    `socket` is then a base name and each process serves on its own `<stem>.<instance>.sock`, so
    two instances (a surge upgrade) never contend for one file and the newer one can take over;
    otherwise `socket` is used as it is. With Registration.PLUGIN_WATCHER the socket is in the
    registry directory, always under its given name (see plugin_watcher.py).
    """

    resource: str
    socket: str
    plugin_dir: str
    per_instance: bool = False
    registration: Registration = Registration.KUBELET
    registry_dir: str = DEFAULT_REGISTRY_DIR

    @property
    def kubelet_socket_path(self) -> str:
        return os.path.join(self.plugin_dir, KUBELET_SOCKET)

    @property
    def socket_dir(self) -> str:
        return self.registry_dir if self.registration is Registration.PLUGIN_WATCHER else self.plugin_dir

    def socket_name(self, instance: int) -> str:
        if not self.per_instance or self.registration is Registration.PLUGIN_WATCHER:
            return self.socket
        return f"{self._stem}.{instance}.sock"

    def instance_of(self, name: str) -> int | None:
        """The instance number of a sibling's socket name, or None if `name` is not one."""
        if not self.per_instance or self.registration is Registration.PLUGIN_WATCHER:
            return None
        match = re.fullmatch(re.escape(self._stem) + r"\.([0-9]{1,19})\.sock", name)
        return int(match.group(1)) if match else None

    @property
    def longest_socket_path(self) -> str:
        """The longest path the plugin binds: its staging name (see staging_name)."""
        return os.path.join(self.socket_dir, staging_name(self.socket_name(10**INSTANCE_DIGITS - 1)))

    @property
    def _stem(self) -> str:
        return self.socket.removesuffix(".sock")


def staging_name(socket: str) -> str:
    """Where a socket is bound before it is renamed into place. gRPC unlinks the path it bound
    when its server stops: binding elsewhere lets a replacement server take the real name while
    the old one still runs, and keeps the old one from unlinking its successor's socket."""
    return f".{socket}.new"


class DirectoryEvent(enum.Enum):
    SOCKET_REMOVED = "a socket was removed"
    SOCKET_CREATED = "a socket was created"
    KUBELET_SOCKET_CREATED = "kubelet.sock was created"
    DIRECTORY_REMOVED = "the device-plugin directory was removed"


def classify(name: str, mask: int) -> DirectoryEvent | None:
    flags = watch.flags
    if mask & watch.GONE:
        return DirectoryEvent.DIRECTORY_REMOVED
    if mask & (flags.CREATE | flags.MOVED_TO):
        return DirectoryEvent.KUBELET_SOCKET_CREATED if name == KUBELET_SOCKET else DirectoryEvent.SOCKET_CREATED
    if mask & (flags.DELETE | flags.MOVED_FROM):
        return DirectoryEvent.SOCKET_REMOVED
    return None


def register(
    kubelet_socket: str,
    endpoint: str,
    resource: str,
    options: api_pb2.DevicePluginOptions,
) -> "grpc.Future":
    """Starts a Register call; the future's result() raises grpc.RpcError on failure."""
    channel = grpc.insecure_channel(f"unix://{kubelet_socket}")
    request = api_pb2.RegisterRequest(version=API_VERSION, endpoint=endpoint, resource_name=resource, options=options)
    future = api_pb2_grpc.RegistrationStub(channel).Register.future(
        request, timeout=REGISTER_TIMEOUT_S, wait_for_ready=False
    )
    future.add_done_callback(lambda _: channel.close())
    return future


def describe_rpc_error(error: BaseException) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'error'}: {details}"
