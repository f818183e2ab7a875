"""What the device-plugin directory's names and events mean (Endpoint, classify), and the
Register call, against real files and sockets."""

import os
import queue
import shutil
import socket
from collections.abc import Iterator

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2
from tests.daemon import short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode
from token_resource import kubelet, watch
from token_resource.kubelet import DirectoryEvent, Endpoint

OPTIONS = api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)
flags = watch.flags
INSTANCE = 1796009551786717806


def test_a_fixed_socket_is_used_as_it_is_and_has_no_siblings() -> None:
    endpoint = Endpoint("example.com/token", "token-resource.sock", "/d")
    assert endpoint.socket_name(INSTANCE) == "token-resource.sock"
    assert endpoint.instance_of(f"token-resource.{INSTANCE}.sock") is None
    assert endpoint.kubelet_socket_path == "/d/kubelet.sock"
    assert endpoint.longest_socket_path == "/d/.token-resource.sock.new"


def test_a_per_instance_socket_names_the_instance() -> None:
    endpoint = Endpoint("example.com/token", "token-resource.sock", "/d", per_instance=True)
    assert endpoint.socket_name(INSTANCE) == f"token-resource.{INSTANCE}.sock"
    assert endpoint.instance_of(f"token-resource.{INSTANCE}.sock") == INSTANCE
    assert endpoint.longest_socket_path == "/d/.token-resource.9999999999999999999.sock.new"


@pytest.mark.parametrize(
    "name",
    [
        "token-resource.sock",  # a fixed-socket instance's
        "kubelet.sock",
        "token-resource.12a.sock",
        "token-resource.12345678901234567890.sock",  # 20 digits: not a start time in ns
        "token-resource-example.com_token.5.sock",  # another resource's
        ".token-resource.5.sock.new",  # a staging name
        "token-resource.5.sock.old",
    ],
)
def test_other_names_are_not_siblings(name: str) -> None:
    assert Endpoint("example.com/token", "token-resource.sock", "/d", per_instance=True).instance_of(name) is None


def test_a_socket_is_bound_under_a_staging_name_first() -> None:
    assert kubelet.staging_name("token-resource.sock") == ".token-resource.sock.new"


@pytest.mark.parametrize(
    "name,mask,event",
    [
        ("kubelet.sock", flags.CREATE, DirectoryEvent.KUBELET_SOCKET_CREATED),
        ("kubelet.sock", flags.MOVED_TO, DirectoryEvent.KUBELET_SOCKET_CREATED),
        ("other.sock", flags.CREATE, DirectoryEvent.SOCKET_CREATED),
        ("other.sock", flags.MOVED_TO, DirectoryEvent.SOCKET_CREATED),
        ("mine.sock", flags.DELETE, DirectoryEvent.SOCKET_REMOVED),
        ("mine.sock", flags.MOVED_FROM, DirectoryEvent.SOCKET_REMOVED),
        ("", flags.DELETE_SELF, DirectoryEvent.DIRECTORY_REMOVED),
        ("", flags.MOVE_SELF, DirectoryEvent.DIRECTORY_REMOVED),
        ("", flags.IGNORED, DirectoryEvent.DIRECTORY_REMOVED),
        ("config.yaml", flags.CLOSE_WRITE, None),
    ],
)
def test_classify(name: str, mask: int, event: DirectoryEvent | None) -> None:
    assert kubelet.classify(name, mask) is event


# A watched directory and the (name, classification) of each event in it.
Classified = tuple[str, queue.Queue[tuple[str, DirectoryEvent | None]]]


@pytest.fixture
def classified() -> Iterator[Classified]:
    """A directory watched as the daemon watches the device-plugin directory; the queue gets
    each event's (name, classification)."""
    directory = short_tempdir()
    events: queue.Queue[tuple[str, DirectoryEvent | None]] = queue.Queue()
    watcher = watch.Watcher()
    watcher.subscribe(
        directory, kubelet.DIRECTORY_MASK, lambda name, mask: events.put((name, kubelet.classify(name, mask)))
    )
    yield directory, events
    watcher.close()
    shutil.rmtree(directory, ignore_errors=True)


def make_socket(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)


def test_a_kubelet_restart_as_the_directory_shows_it(
    classified: Classified,
) -> None:
    directory, events = classified
    make_socket(os.path.join(directory, "mine.sock"))
    with open(os.path.join(directory, "kubelet_internal_checkpoint"), "w") as f:
        f.write("{}")  # its CLOSE_WRITE is not in the mask
    os.unlink(os.path.join(directory, "mine.sock"))
    make_socket(os.path.join(directory, "kubelet.sock.tmp"))
    os.rename(os.path.join(directory, "kubelet.sock.tmp"), os.path.join(directory, "kubelet.sock"))
    seen = [events.get(timeout=5) for _ in range(6)]
    assert seen == [
        ("mine.sock", DirectoryEvent.SOCKET_CREATED),
        ("kubelet_internal_checkpoint", DirectoryEvent.SOCKET_CREATED),  # by name only: the runner checks files
        ("mine.sock", DirectoryEvent.SOCKET_REMOVED),
        ("kubelet.sock.tmp", DirectoryEvent.SOCKET_CREATED),
        ("kubelet.sock.tmp", DirectoryEvent.SOCKET_REMOVED),
        ("kubelet.sock", DirectoryEvent.KUBELET_SOCKET_CREATED),
    ]


def test_the_directory_going_away(classified: Classified) -> None:
    directory, events = classified
    shutil.rmtree(directory)
    assert events.get(timeout=5) == ("", DirectoryEvent.DIRECTORY_REMOVED)


def test_register_reaches_the_kubelet() -> None:
    directory = short_tempdir()
    fake = FakeKubelet(directory, Mode.E1)
    fake.start()
    try:
        kubelet.register(fake.socket_path, "mine.sock", "example.com/token", OPTIONS).result()
        request = fake.register_requests[0]
        assert (request.version, request.endpoint, request.resource_name) == (
            "v1beta1",
            "mine.sock",
            "example.com/token",
        )
        assert request.options == OPTIONS
    finally:
        fake.stop()
        shutil.rmtree(directory)


def test_register_fails_fast_without_a_kubelet() -> None:
    directory = short_tempdir()
    try:
        future = kubelet.register(os.path.join(directory, "kubelet.sock"), "mine.sock", "example.com/token", OPTIONS)
        with pytest.raises(grpc.RpcError) as raised:
            future.result(timeout=10)
        assert kubelet.describe_rpc_error(raised.value).startswith("UNAVAILABLE: ")
    finally:
        shutil.rmtree(directory)
