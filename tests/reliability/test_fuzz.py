"""Property-based fuzzing of every DevicePlugin method, of raw request bytes, and of raw bytes
on the socket. Each answer is checked against an independent oracle of what the daemon must
say; afterwards the daemon's memory, threads and descriptors must be bounded.

CI runs a fixed, derandomized sample; `--test_env=TR_RELIABILITY=full` runs many more, random.
"""

import os
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests import procfs
from tests.daemon import Daemon, short_tempdir
from tests.reliability.common import FULL, SOCKET, channel, plugin_args, ready, stub

T = TypeVar("T")

COUNT = 1000
METHODS = ["GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation", "Allocate", "PreStartContainer"]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "full", max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("full" if FULL else "ci")

# IDs: mostly real tokens (some just past the end), plus near-misses and arbitrary text.
ids = st.one_of(
    st.integers(0, COUNT + 50).map(lambda i: f"item-{i}"),
    st.sampled_from(
        ["item-", "item-00", "item-01", "item-+1", "item--1", "item-1 ", " item-1", "Item-1", "item-1\x00"]
    ),
    st.text(max_size=16),
)
id_lists = st.lists(ids, max_size=10)
sizes = st.one_of(st.integers(-2, 12), st.integers(-(2**31), 2**31 - 1))


def _index(token: str) -> int | None:
    """The oracle's own reading of a token ID: item-<decimal without leading zero> below COUNT."""
    digits = token[5:] if token.startswith("item-") else ""
    if digits.isascii() and digits.isdigit() and (digits == "0" or not digits.startswith("0")):
        value = int(digits)
        return value if value < COUNT else None
    return None


# The daemon's directory, the daemon, a channel to it, a stub on that, and its (RSS, threads,
# descriptors) after warming up.
Served = tuple[str, Daemon, grpc.Channel, api_pb2_grpc.DevicePluginStub, tuple[int, int, int]]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    directory = short_tempdir()
    daemon = Daemon(*plugin_args(directory, f"--count={COUNT}"))
    ch = channel(directory)
    try:
        ready(ch, timeout=30)
        plugin = stub(ch)
        # Warm up every method once so the baseline includes lazily created state.
        plugin.Allocate(
            api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-0"])])
        )
        baseline = (procfs.rss_bytes(daemon.pid), procfs.threads(daemon.pid), procfs.fds(daemon.pid))
        yield directory, daemon, ch, plugin, baseline
    finally:
        ch.close()
        rc = daemon.terminate()
        log = daemon.log()
        daemon.close()
        # An exception inside a handler would read "Exception calling application", and one in
        # grpcio's deserialization "Exception deserializing"; the daemon lets neither happen.
        assert rc == 0 and "Exception calling application" not in log, log[-3000:]
        assert "Exception deserializing" not in log, log[-3000:]


def _call(fn: Callable[[], T]) -> tuple[grpc.StatusCode, T | str | None]:
    """The status code, and the answer or the error's details."""
    try:
        return grpc.StatusCode.OK, fn()
    except grpc.RpcError as error:
        return error.code(), error.details()


def raw_unary(ch: grpc.Channel, path: str) -> "grpc.UnaryUnaryMultiCallable[bytes, bytes]":
    """A unary method called with the request's bytes as they are (no serializer)."""
    return ch.unary_unary(path)


@given(containers=st.lists(id_lists, max_size=4))
def test_allocate(served: Served, containers: list[list[str]]) -> None:
    _, _daemon, _, plugin, _ = served
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=c) for c in containers]
    )
    code, answer = _call(lambda: plugin.Allocate(request, timeout=10))
    valid = bool(containers) and all(
        c and len(set(c)) == len(c) and all(_index(t) is not None for t in c) for c in containers
    )
    assert code == (grpc.StatusCode.OK if valid else grpc.StatusCode.INVALID_ARGUMENT), (code, answer)
    if valid:
        assert isinstance(answer, api_pb2.AllocateResponse)
        assert len(answer.container_responses) == len(containers)
        for asked, got in zip(containers, answer.container_responses, strict=False):
            held = ",".join(sorted(asked, key=lambda t: _index(t) or 0))
            assert dict(got.envs) == {"EXAMPLE_COM_TOKEN": held}
            assert dict(got.annotations) == {"example.com/token": held}


@given(requests=st.lists(st.tuples(id_lists, id_lists, sizes), max_size=3))
def test_get_preferred_allocation(served: Served, requests: list[tuple[list[str], list[str], int]]) -> None:
    _, _, _, plugin, _ = served
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=a, must_include_deviceIDs=m, allocation_size=s
            )
            for a, m, s in requests
        ]
    )
    code, answer = _call(lambda: plugin.GetPreferredAllocation(request, timeout=10))

    # Advice, never a refusal: unique IDs this node has, every such must-include ID, and
    # `size` of them whenever the offer allows.
    assert code == grpc.StatusCode.OK, (code, answer)
    assert isinstance(answer, api_pb2.PreferredAllocationResponse)
    assert len(answer.container_responses) == len(requests)
    for (available, must, size), got in zip(requests, answer.container_responses, strict=True):
        chosen = list(got.deviceIDs)
        known_must = {t for t in must if _index(t) is not None}
        offer = known_must | {t for t in available if _index(t) is not None}
        assert len(set(chosen)) == len(chosen) and known_must <= set(chosen) <= offer
        assert len(chosen) == max(len(known_must), min(max(size, 0), len(offer)))


@given(devices=id_lists)
def test_prestart_container(served: Served, devices: list[str]) -> None:
    _, _, _, plugin, _ = served
    assert plugin.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=devices), timeout=10) == (
        api_pb2.PreStartContainerResponse()
    )


def test_options_and_list_and_watch(served: Served) -> None:
    _, _, _ch, plugin, _ = served
    for _ in range(20):
        assert plugin.GetDevicePluginOptions(api_pb2.Empty(), timeout=10).get_preferred_allocation_available
        stream = plugin.ListAndWatch(api_pb2.Empty())
        assert len(next(stream).devices) == COUNT
        stream.cancel()


@given(name=st.text(min_size=1, max_size=30).filter(lambda n: n not in METHODS and "/" not in n))
def test_unknown_methods(served: Served, name: str) -> None:
    _, _, ch, _, _ = served
    code, _ = _call(lambda: raw_unary(ch, f"/v1beta1.DevicePlugin/{name}")(b"", timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED


@settings(max_examples=60 if not FULL else 1500)
@given(prefix=st.sampled_from([b"", PREFACE]), body=st.binary(max_size=4096))
def test_raw_bytes_on_the_socket(served: Served, prefix: bytes, body: bytes) -> None:
    directory, daemon, _, plugin, _ = served
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(5)
        raw.connect(os.path.join(directory, SOCKET))
        try:
            raw.sendall(prefix + body)
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):  # drain whatever the server says until it closes
                pass
        except (ConnectionError, TimeoutError):
            pass  # the server may drop the connection first, or keep it waiting for frames
    assert plugin.GetDevicePluginOptions(api_pb2.Empty(), timeout=5).get_preferred_allocation_available
    assert daemon.process.poll() is None


def test_memory_threads_and_descriptors_stay_bounded(served: Served) -> None:
    """After every well-formed example above, the daemon is no bigger than a pool's worth of
    threads and a few MiB above where it started."""
    _, daemon, _, plugin, (rss0, threads0, fds0) = served
    assert plugin.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
    rss = procfs.rss_bytes(daemon.pid)
    threads = procfs.wait_for(lambda: procfs.threads(daemon.pid), lambda n: n <= threads0 + 16, timeout=10)
    fds = procfs.wait_for(lambda: procfs.fds(daemon.pid), lambda n: n <= fds0 + 2, timeout=10)
    print(
        f"fuzz: RSS {rss0 / 2**20:.1f} -> {rss / 2**20:.1f} MiB, threads {threads0} -> {threads}, fds {fds0} -> {fds}"
    )
    assert rss - rss0 < 16 * 2**20
    assert threads <= threads0 + 16  # the server's worker pool grows lazily up to 16
    assert fds <= fds0 + 2


@given(method=st.sampled_from(METHODS), body=st.binary(max_size=2048))
def test_raw_request_bytes(served: Served, method: str, body: bytes) -> None:
    """Arbitrary bytes as the request message: a parse failure is INVALID_ARGUMENT; a message
    that parses is answered as usual; never UNKNOWN or INTERNAL (an exception in a handler or
    in grpcio's deserialization) and never a hang."""
    _, _, ch, _, _ = served
    path = f"/v1beta1.DevicePlugin/{method}"
    if method == "ListAndWatch":
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(path)
        call = stream(body, timeout=10)
        code, _ = _call(lambda: next(call))
        call.cancel()
    else:
        code, _ = _call(lambda: raw_unary(ch, path)(body, timeout=10))
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def test_undecodable_requests_do_not_grow_memory(served: Served) -> None:
    """grpcio 1.85's server leaks about 16 KB for every request its deserializer rejects
    ("Exception deserializing request!"), measured on a bare grpcio server too. The daemon's
    deserializers never raise (the handler answers INVALID_ARGUMENT), so garbage costs nothing."""
    _, daemon, ch, _, _ = served
    undecodable = b"\xff\xff\xff\xff"
    call = raw_unary(ch, "/v1beta1.DevicePlugin/Allocate")
    for _ in range(200):  # warm-up
        _call(lambda: call(undecodable, timeout=10))
    rss0 = procfs.rss_bytes(daemon.pid)
    for _ in range(2000):
        _call(lambda: call(undecodable, timeout=10))
    growth = procfs.rss_bytes(daemon.pid) - rss0
    print(f"2000 undecodable requests: RSS +{growth / 2**20:.1f} MiB")
    assert growth < 4 * 2**20
