"""Talking to the kubelet: the Register call and the device-plugin directory's events.

Nothing here knows what the plugin serves. The kubelet signals a restart only by deleting the
plugin sockets and creating a new kubelet.sock (or by closing its connections), so the
directory is watched with inotify and each event is handed on as a `DirectoryEvent`.
"""

import enum
from collections.abc import Callable

import grpc

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from token_resource import watch
from token_resource.config import KUBELET_SOCKET

API_VERSION = "v1beta1"
# The kubelet (1.25+) dials back and calls GetDevicePluginOptions before it answers, allowing
# itself 10 s for the dial: wait well beyond that.
REGISTER_TIMEOUT_S = 30.0


class DirectoryEvent(enum.Enum):
    SOCKET_REMOVED = "the plugin socket was removed"
    KUBELET_SOCKET_CREATED = "kubelet.sock was created"
    DIRECTORY_REMOVED = "the device-plugin directory was removed"


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


def describe_rpc_error(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'error'}: {details}"


class DirectoryWatch:
    """Reports removals of one socket and creations of kubelet.sock in the plugin directory."""

    _MASK = (
        watch.flags.CREATE
        | watch.flags.DELETE
        | watch.flags.MOVED_FROM
        | watch.flags.MOVED_TO
        | watch.flags.DELETE_SELF
        | watch.flags.MOVE_SELF
    )

    def __init__(self, directory: str, socket: str, on_event: Callable[[DirectoryEvent], None]) -> None:
        self._socket = socket
        self._on_event = on_event
        self._events = watch.DirectoryEvents(directory, self._MASK, self._translate, name="plugin-dir-watch")

    def close(self) -> None:
        self._events.close()

    def _translate(self, name: str, mask: int) -> None:
        flags = watch.flags
        if mask & (flags.DELETE_SELF | flags.MOVE_SELF):
            self._on_event(DirectoryEvent.DIRECTORY_REMOVED)
        elif name == self._socket and mask & (flags.DELETE | flags.MOVED_FROM):
            self._on_event(DirectoryEvent.SOCKET_REMOVED)
        elif name == KUBELET_SOCKET and mask & (flags.CREATE | flags.MOVED_TO):
            self._on_event(DirectoryEvent.KUBELET_SOCKET_CREATED)
