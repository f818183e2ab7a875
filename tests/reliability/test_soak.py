"""Soak: many Allocate calls (one in ten refused) through a registered daemon; resident memory
must not grow by 2 MiB or more. CI makes 20,000 calls; TR_RELIABILITY=full makes 100,000."""

import grpc

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests import procfs
from tests.conftest import StartDaemon
from tests.fake_kubelet import FakeKubelet, advertising
from tests.reliability.common import (
    RESOURCE,
    allocate_request,
    channel,
    plugin_args,
    ready,
    scaled,
    stub,
)

COUNT = 64
CALLS = scaled(20_000, 100_000)
WARM_UP = 3_000


def _requests() -> list[api_pb2.AllocateRequest]:
    """A rotating mix like a busy node's: 1 to 8 tokens per container, and a bad ID every tenth."""
    return [
        allocate_request([f"item-{COUNT + i}"])
        if i % 10 == 0
        else allocate_request([f"item-{(i + j) % COUNT}" for j in range(1 + i % 8)])
        for i in range(100)
    ]


def _run(plugin: api_pb2_grpc.DevicePluginStub, requests: list[api_pb2.AllocateRequest], calls: int) -> tuple[int, int]:
    ok = refused = 0
    for i in range(calls):
        try:
            plugin.Allocate(requests[i % len(requests)], timeout=10)
            ok += 1
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            refused += 1
    return ok, refused


def test_allocate_soak_keeps_memory_flat(kubelet: FakeKubelet, daemons: StartDaemon) -> None:
    daemon = daemons(*plugin_args(kubelet.directory, f"--count={COUNT}"))
    kubelet.wait_until(advertising(RESOURCE, COUNT))
    ch = channel(kubelet.directory)
    ready(ch)
    idle_threads = procfs.threads(daemon.pid)
    plugin = stub(ch)
    requests = _requests()
    _run(plugin, requests, WARM_UP)  # let allocator arenas and gRPC's caches reach steady state
    rss0, threads0, fds0 = procfs.rss_bytes(daemon.pid), procfs.threads(daemon.pid), procfs.fds(daemon.pid)
    ok, refused = _run(plugin, requests, CALLS)
    rss, threads, fds = procfs.rss_bytes(daemon.pid), procfs.threads(daemon.pid), procfs.fds(daemon.pid)
    ch.close()
    print(
        f"soak: {CALLS} calls ({refused} refused): RSS {rss0 / 2**20:.2f} -> {rss / 2**20:.2f} MiB, "
        f"threads {threads0} -> {threads}, fds {fds0} -> {fds}"
    )
    assert (ok, refused) == (CALLS * 9 // 10, CALLS // 10)
    assert rss - rss0 < 2 * 2**20
    assert threads <= idle_threads + 16 and fds <= fds0  # the worker pool grows lazily to 16
    assert kubelet.resources[RESOURCE].connected and len(kubelet.register_requests) == 1
