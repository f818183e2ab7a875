"""Kubelets and clients that break the protocol: the daemon answers with proper gRPC status
codes, registers again where the protocol says it must (docs §2.10, §3.9), and never crashes."""

import concurrent.futures
import itertools
import os
import socket
from collections.abc import Callable, Iterator

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests import procfs
from tests.conftest import StartDaemon
from tests.daemon import Daemon
from tests.fake_kubelet import FakeKubelet, Mode, advertising
from tests.reliability.common import (
    RESOURCE,
    SOCKET,
    allocate_request,
    channel,
    plugin_args,
    ready,
    stub,
)
from tests.reliability.rogue_kubelet import Behaviour, RogueKubelet
from token_resource import tokens
from token_resource.plugin_server import SERVER_THREADS
from tokenresource.handoff.v1 import api_pb2 as handoff_pb2
from tokenresource.handoff.v1 import api_pb2_grpc as handoff_pb2_grpc

MAX_COUNT = tokens.max_count()  # the largest snapshot the kubelet can receive


def test_reregisters_when_listandwatch_never_comes(plugin_dir: str, daemons: StartDaemon) -> None:
    rogue = RogueKubelet(plugin_dir, [Behaviour.OK_NO_STREAM])
    rogue.start()
    try:
        daemon = daemons(*plugin_args(plugin_dir, "--count=2", "--list_and_watch_timeout=0.3"))
        rogue.wait_until(lambda k: len(k.register_times) >= 4)
        gaps = [b - a for a, b in zip(rogue.register_times, rogue.register_times[1:], strict=False)]
        assert min(gaps) >= 0.3, gaps  # waits the whole timeout each time: no hot loop
        assert daemon.process.poll() is None
    finally:
        rogue.stop()


def test_reregisters_each_time_the_stream_is_closed_at_once_backing_off(plugin_dir: str, daemons: StartDaemon) -> None:
    # Four immediately closed streams, then one that the kubelet keeps.
    rogue = RogueKubelet(plugin_dir, [Behaviour.CLOSE_STREAM] * 4 + [Behaviour.GOOD])
    rogue.start()
    try:
        daemon = daemons(*plugin_args(plugin_dir, "--count=2"))
        rogue.wait_until(lambda k: len(k.register_times) == 5 and k.open_streams == 1 and k.snapshots == 5, timeout=30)
        gaps = [b - a for a, b in itertools.pairwise(rogue.register_times)]
        # The first drop costs nothing (a kubelet 1.25-1.36 drops a new stream once when the
        # instance it replaced disconnects); then the back-off grows (0.25-0.5 s, 0.5-1 s, 1-2 s):
        # no Register loop against a kubelet that keeps dropping the stream.
        assert gaps[0] < gaps[1] and gaps[1] >= 0.25 and gaps[-1] >= 1.0 and gaps[-1] > gaps[1], gaps
        ch = channel(plugin_dir)
        assert stub(ch).Allocate(allocate_request(["item-0"]), timeout=10).container_responses
        ch.close()
        assert len(rogue.register_times) == 5  # exactly one registration per closed stream
        assert daemon.process.poll() is None
    finally:
        rogue.stop()


def test_a_hanging_register_is_abandoned_when_the_kubelet_restarts(plugin_dir: str, daemons: StartDaemon) -> None:
    rogue = RogueKubelet(plugin_dir, [Behaviour.HANG])
    rogue.start()
    daemon = daemons(*plugin_args(plugin_dir, "--count=2"))
    rogue.wait_until(lambda k: len(k.register_times) == 1)
    rogue.stop()
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()  # a new kubelet.sock: the daemon must not wait out its 30 s Register deadline
    try:
        kubelet.wait_until(advertising(RESOURCE, 2), timeout=10)
        assert daemon.process.poll() is None
        assert kubelet.violations == []
    finally:
        kubelet.stop()


# The daemon's directory, the daemon, and a stub on a channel to it.
BigDaemon = tuple[str, Daemon, api_pb2_grpc.DevicePluginStub]


@pytest.fixture(scope="module")
def big_daemon() -> Iterator[BigDaemon]:
    """One daemon with the largest accepted token count, serving without a kubelet."""
    from tests.daemon import Daemon, short_tempdir

    directory = short_tempdir()
    daemon = Daemon(*plugin_args(directory, f"--count={MAX_COUNT}"))
    ch = channel(directory, **{"grpc.max_receive_message_length": 64 * 1024 * 1024})
    try:
        ready(ch, timeout=30)
        yield directory, daemon, stub(ch)
    finally:
        ch.close()
        rc = daemon.terminate()
        log = daemon.log()
        daemon.close()
        assert rc == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "containers,message",
    [
        ([[f"item-{MAX_COUNT}"]], f'unknown token ID "item-{MAX_COUNT}"'),
        ([["item-01"]], "unknown token ID"),
        ([["item--1"]], "unknown token ID"),
        ([["item-1e3"]], "unknown token ID"),
        ([["ITEM-1"]], "unknown token ID"),
        ([["item-٣"]], "unknown token ID"),  # a non-ASCII digit
        ([[""]], "unknown token ID"),
        # A huge ID or a long duplicate list must not make a status message above gRPC's
        # 16 KiB metadata limit (the client would see RESOURCE_EXHAUSTED instead).
        ([["x" * 100_000]], "unknown token ID"),
        ([["item-7"] * 20_000], "duplicate token IDs"),
        ([["item-1", "item-1"]], "duplicate token IDs"),
        ([[]], "has no token IDs"),
        ([], "no container requests"),
        ([["item-0"], ["item-1", "nope"]], "unknown token ID"),
    ],
)
def test_allocate_refuses_bad_ids_with_invalid_argument(
    big_daemon: BigDaemon, containers: list[list[str]], message: str
) -> None:
    _, daemon, plugin = big_daemon
    with pytest.raises(grpc.RpcError) as raised:
        plugin.Allocate(allocate_request(*containers), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details()
    assert details is not None and message in details
    assert len(details) < 2000  # a 100 kB ID is not echoed back whole
    assert daemon.process.poll() is None


@pytest.mark.parametrize(
    "available,must,size,code",
    [
        # advice, never a refusal (a refusal would fail the pod's admission)
        (["item-0", "item-1"], [], 3, grpc.StatusCode.OK),
        (["item-0"], ["item-0", "item-1"], 1, grpc.StatusCode.OK),
        (["item-0", "bogus"], [], 1, grpc.StatusCode.OK),
        (["item-0"], [], -1, grpc.StatusCode.OK),
        (["item-0"], [], 2**31 - 1, grpc.StatusCode.OK),
        ([], [], 0, grpc.StatusCode.OK),
        (["item-2", "item-2", "item-1"], [], 2, grpc.StatusCode.OK),
    ],
)
def test_preferred_allocation_status_codes(
    big_daemon: BigDaemon, available: list[str], must: list[str], size: int, code: grpc.StatusCode
) -> None:
    _, _, plugin = big_daemon
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
            )
        ]
    )
    assert _code(lambda: plugin.GetPreferredAllocation(request, timeout=10)) == code


def test_huge_requests(big_daemon: BigDaemon) -> None:
    _, daemon, plugin = big_daemon
    every = [f"item-{i}" for i in range(MAX_COUNT)]
    # All tokens in one Allocate (2.3 MB request, 2.1 MB answer).
    response = plugin.Allocate(allocate_request(every), timeout=30)
    assert response.container_responses[0].envs["EXAMPLE_COM_TOKEN"].count(",") == MAX_COUNT - 1
    # GetPreferredAllocation offered every token (checklist 38), from the top down.
    preferred = plugin.GetPreferredAllocation(
        api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=every[::-1], allocation_size=MAX_COUNT // 2
                )
            ]
        ),
        timeout=30,
    )
    assert list(preferred.container_responses[0].deviceIDs) == every[: MAX_COUNT // 2]
    # A request above the server's 64 MiB receive limit is refused by gRPC, not by a crash.
    too_big = allocate_request(["x" * (64 * 1024 * 1024 + 1)])
    assert _code(lambda: plugin.Allocate(too_big, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # PreStartContainer with 10 MB of IDs: answered (the daemon asks for no pre-start).
    assert plugin.PreStartContainer(
        api_pb2.PreStartContainerRequest(devices_ids=["y" * 1000] * 10_000), timeout=30
    ) == (api_pb2.PreStartContainerResponse())
    assert daemon.process.poll() is None


def test_clients_that_vanish_mid_call(big_daemon: BigDaemon) -> None:
    directory, daemon, _ = big_daemon
    every = allocate_request([f"item-{i}" for i in range(MAX_COUNT)])
    before_threads, before_fds = procfs.threads(daemon.pid), procfs.fds(daemon.pid)
    for _ in range(5):
        # Eight large Allocates in flight, and the connection closed under them.
        ch = channel(directory, **{"grpc.max_receive_message_length": 64 * 1024 * 1024})
        futures = [stub(ch).Allocate.future(every, timeout=30) for _ in range(8)]
        futures[0].exception()  # wait for one answer, so the rest are mid-flight or queued
        ch.close()
        for future in futures:
            assert (
                future.cancelled()
                or future.exception() is None
                or future.code()
                in (
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNAVAILABLE,
                )
            )
        # ListAndWatch opened and dropped after its 2 MB first message.
        ch = channel(directory, **{"grpc.max_receive_message_length": 64 * 1024 * 1024})
        stream = stub(ch).ListAndWatch(api_pb2.Empty())
        assert len(next(stream).devices) == MAX_COUNT
        ch.close()
    # Raw connections that stop half-way through the HTTP/2 preface or a frame.
    path = os.path.join(directory, SOCKET)
    for partial in (b"PRI * HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", b"\x16\x03\x01\x00"):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(path)
            raw.sendall(partial)
    # The daemon still answers at once and its threads and descriptors come back down.
    ch = channel(directory)
    assert stub(ch).GetDevicePluginOptions(api_pb2.Empty(), timeout=10).get_preferred_allocation_available
    ch.close()
    # The server's worker pool grows lazily to its cap of 16 and keeps its threads; anything
    # beyond that would be a leak. Descriptors must come all the way back.
    cap = before_threads + SERVER_THREADS
    threads = procfs.wait_for(lambda: procfs.threads(daemon.pid), lambda n: n <= cap, timeout=10)
    fds = procfs.wait_for(lambda: procfs.fds(daemon.pid), lambda n: n <= before_fds, timeout=10)
    assert threads <= cap and fds <= before_fds, f"threads {before_threads}->{threads}, fds {before_fds}->{fds}"
    assert daemon.process.poll() is None


def assert_allocate_answers_beside(big_daemon: BigDaemon, open_streams: Callable[[grpc.Channel], list[object]]) -> None:
    """With the streams `open_streams` opened on one channel (held: a call object that is garbage
    collected is cancelled), two concurrent Allocates are still answered and the daemon lives."""
    directory, daemon, plugin = big_daemon
    ch = channel(directory, **{"grpc.max_receive_message_length": 64 * 1024 * 1024})
    _streams = open_streams(ch)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(plugin.Allocate, allocate_request([f"item-{i}"]), timeout=5) for i in range(2)]
            for f in futures:
                assert f.result().container_responses
    finally:
        ch.close()
    assert daemon.process.poll() is None


def test_many_streams_do_not_starve_allocate(big_daemon: BigDaemon) -> None:
    """Streams pin a worker each; twice as many streams as the pool has workers must still
    leave Allocate answering (the daemon ends the oldest beyond a few)."""
    assert_allocate_answers_beside(
        big_daemon, lambda ch: [stub(ch).ListAndWatch(api_pb2.Empty()) for _ in range(2 * SERVER_THREADS)]
    )


def test_many_handoff_watches_do_not_starve_allocate(big_daemon: BigDaemon) -> None:
    """Handoff.Watch streams (an older instance follows a newer one with one) pin a worker each
    too: a flood of them, with every ListAndWatch the cap allows, still leaves Allocate answering."""

    def flood(ch: grpc.Channel) -> list[object]:
        watch = handoff_pb2_grpc.HandoffStub(ch).Watch
        streams: list[object] = [stub(ch).ListAndWatch(api_pb2.Empty()) for _ in range(SERVER_THREADS)]
        return streams + [watch(handoff_pb2.WatchRequest(resource=RESOURCE)) for _ in range(2 * SERVER_THREADS)]

    assert_allocate_answers_beside(big_daemon, flood)
