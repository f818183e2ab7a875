"""Register calls and the device-plugin directory watch, against real files and sockets."""

import os
import queue
import shutil
import socket

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2
from tests.daemon import short_tempdir
from tests.fake_kubelet import FakeKubelet, Mode
from token_resource import kubelet

OPTIONS = api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)


@pytest.fixture
def watched():
    directory = short_tempdir()
    events: queue.Queue = queue.Queue()
    watch = kubelet.DirectoryWatch(directory, "mine.sock", events.put)
    yield directory, events
    watch.close()
    shutil.rmtree(directory, ignore_errors=True)


def make_socket(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)


def test_reports_kubelet_socket_creation_and_ignores_other_files(watched):
    directory, events = watched
    make_socket(os.path.join(directory, "other.sock"))
    with open(os.path.join(directory, "kubelet_internal_checkpoint"), "w"):
        pass
    make_socket(os.path.join(directory, "kubelet.sock"))
    assert events.get(timeout=5) is kubelet.DirectoryEvent.KUBELET_SOCKET_CREATED


def test_reports_a_kubelet_socket_moved_into_place(watched):
    directory, events = watched
    make_socket(os.path.join(directory, "kubelet.sock.tmp"))
    os.rename(os.path.join(directory, "kubelet.sock.tmp"), os.path.join(directory, "kubelet.sock"))
    assert events.get(timeout=5) is kubelet.DirectoryEvent.KUBELET_SOCKET_CREATED


def test_reports_removal_of_its_own_socket_only(watched):
    directory, events = watched
    for name in ("other.sock", "mine.sock"):
        make_socket(os.path.join(directory, name))
    os.unlink(os.path.join(directory, "other.sock"))
    os.unlink(os.path.join(directory, "mine.sock"))
    assert events.get(timeout=5) is kubelet.DirectoryEvent.SOCKET_REMOVED


def test_reports_the_directory_going_away(watched):
    directory, events = watched
    shutil.rmtree(directory)
    assert events.get(timeout=5) is kubelet.DirectoryEvent.DIRECTORY_REMOVED


def test_register_reaches_the_kubelet():
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


def test_register_fails_fast_without_a_kubelet():
    directory = short_tempdir()
    try:
        future = kubelet.register(os.path.join(directory, "kubelet.sock"), "mine.sock", "example.com/token", OPTIONS)
        with pytest.raises(grpc.RpcError) as raised:
            future.result(timeout=10)
        assert kubelet.describe_rpc_error(raised.value).startswith("UNAVAILABLE: ")
    finally:
        shutil.rmtree(directory)
