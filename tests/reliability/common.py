"""Shared by the reliability tests: suite size, gRPC helpers, and what "healthy" means.

The suite is CI-sized by default. `--test_env=TR_RELIABILITY=full` runs the sizes the issue
names (100k soak calls, thousands of fuzz examples); see README.md beside this file.
"""

import os

import grpc

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "example.com/token"
SOCKET = "token-resource.sock"
FULL = os.environ.get("TR_RELIABILITY", "ci") == "full"

# Every status the daemon may legitimately answer with. Anything else (UNKNOWN: an uncaught
# exception in a handler; DEADLINE_EXCEEDED: a hang) is a defect.
REFUSED = grpc.StatusCode.INVALID_ARGUMENT


def scaled(ci: int, full: int) -> int:
    return full if FULL else ci


def plugin_args(plugin_dir: str, *extra: str) -> list[str]:
    """The daemon serving on SOCKET (a fixed name) in `plugin_dir`."""
    return [f"--plugin_dir={plugin_dir}", f"--socket={SOCKET}", *extra]


def channel(plugin_dir: str, **options: int | str) -> grpc.Channel:
    """A client channel to the daemon's socket, as the kubelet dials it."""
    opts = [("grpc.default_authority", "localhost"), *options.items()]
    return grpc.insecure_channel(f"unix://{os.path.join(plugin_dir, SOCKET)}", options=opts)


def stub(ch: grpc.Channel) -> api_pb2_grpc.DevicePluginStub:
    return api_pb2_grpc.DevicePluginStub(ch)


def allocate_request(*containers: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
    )


def ready(ch: grpc.Channel, timeout: float = 10.0) -> None:
    grpc.channel_ready_future(ch).result(timeout=timeout)
