"""The DevicePlugin servicer over a real unix socket, with the token policy behind it."""

import concurrent.futures
import queue
import shutil
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import Message

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.daemon import short_tempdir
from token_resource import tokens
from token_resource.device_plugin import MAX_STREAMS, DevicePluginServicer


class Listener:
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, int]] = queue.Queue()

    def stream_opened(self, servicer: DevicePluginServicer, stream: int) -> None:
        self.events.put(("opened", stream))

    def stream_closed(self, servicer: DevicePluginServicer, stream: int) -> None:
        self.events.put(("closed", stream))


# The servicer under test, a client of its socket, and the listener of its streams.
Served = tuple[DevicePluginServicer, api_pb2_grpc.DevicePluginStub, "Listener"]


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = short_tempdir()
    yield f"{directory}/p.sock"
    shutil.rmtree(directory)


@pytest.fixture
def served(socket_path: str) -> Iterator[Served]:
    """(servicer, stub, listener) for a servicer with 3 tokens on a unix socket."""
    listener = Listener()
    servicer = DevicePluginServicer(tokens.TokenPolicy("example.com/token", 3), listener)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    servicer.add_to_server(server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    yield servicer, api_pb2_grpc.DevicePluginStub(channel), listener
    channel.close()
    server.stop(None).wait()


def ids(snapshot: api_pb2.ListAndWatchResponse) -> list[str]:
    return [d.ID for d in snapshot.devices]


def test_list_and_watch_sends_the_snapshot_then_only_changes(served: Served) -> None:
    servicer, stub, listener = served
    stream = stub.ListAndWatch(api_pb2.Empty())
    assert ids(next(stream)) == ["item-0", "item-1", "item-2"]
    assert listener.events.get(timeout=5) == ("opened", 0)
    servicer.set_policy(tokens.TokenPolicy("example.com/token", 3))  # the same devices: nothing is sent
    servicer.set_policy(tokens.TokenPolicy("example.com/token", 1))
    assert ids(next(stream)) == ["item-0"]
    stream.cancel()


def test_every_open_stream_gets_each_change(served: Served) -> None:
    servicer, stub, _ = served
    streams = [stub.ListAndWatch(api_pb2.Empty()) for _ in range(3)]
    for stream in streams:
        next(stream)
    servicer.set_policy(tokens.TokenPolicy("example.com/token", 2))
    assert [ids(next(s)) for s in streams] == [["item-0", "item-1"]] * 3
    for stream in streams:
        stream.cancel()


def allocate(stub: api_pb2_grpc.DevicePluginStub, *token_ids: str) -> api_pb2.AllocateResponse:
    return stub.Allocate(
        api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=token_ids)]), timeout=5
    )


def preferred(stub: api_pb2_grpc.DevicePluginStub, available: list[str], size: int) -> list[str]:
    response = stub.GetPreferredAllocation(
        api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=available, allocation_size=size)
            ]
        ),
        timeout=5,
    )
    return list(response.container_responses[0].deviceIDs)


def test_a_new_policy_answers_every_call_from_then_on(served: Served) -> None:
    servicer, stub, _ = served
    stream = stub.ListAndWatch(api_pb2.Empty())
    next(stream)
    servicer.set_policy(tokens.TokenPolicy("example.com/token", 3).reconfigured(1))  # a count decrease
    assert ids(next(stream)) == ["item-0"]
    # The kubelet may still pick a dropped token until it has read the snapshot: accepted ...
    assert dict(allocate(stub, "item-2").container_responses[0].envs) == {"EXAMPLE_COM_TOKEN": "item-2"}
    # ... but never suggested.
    assert preferred(stub, ["item-2", "item-1", "item-0"], 2) == ["item-0"]
    servicer.set_policy(tokens.TokenPolicy("example.com/token", 1).reconfigured(4))
    assert ids(next(stream)) == ["item-0", "item-1", "item-2", "item-3"]
    assert preferred(stub, ["item-3", "item-1"], 2) == ["item-1", "item-3"]
    with pytest.raises(grpc.RpcError) as raised:
        allocate(stub, "item-4")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream.cancel()


def test_each_stream_end_is_reported_as_that_stream(served: Served) -> None:
    servicer, stub, listener = served
    first = stub.ListAndWatch(api_pb2.Empty())
    next(first)
    second = stub.ListAndWatch(api_pb2.Empty())
    next(second)
    assert [listener.events.get(timeout=5) for _ in range(2)] == [("opened", 0), ("opened", 1)]
    assert servicer.open_streams == 2
    second.cancel()
    assert listener.events.get(timeout=5) == ("closed", 1)
    first.cancel()
    assert listener.events.get(timeout=5) == ("closed", 0)
    assert servicer.open_streams == 0


def test_all_five_methods_answer(served: Served) -> None:
    _, stub, _ = served
    options = stub.GetDevicePluginOptions(api_pb2.Empty())
    assert options.get_preferred_allocation_available and not options.pre_start_required
    preferred = stub.GetPreferredAllocation(
        api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=["item-2", "item-1", "item-0"],
                    must_include_deviceIDs=["item-2"],
                    allocation_size=2,
                )
            ]
        )
    )
    assert list(preferred.container_responses[0].deviceIDs) == ["item-2", "item-0"]
    allocated = stub.Allocate(
        api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-2"])])
    )
    assert dict(allocated.container_responses[0].envs) == {"EXAMPLE_COM_TOKEN": "item-2"}
    assert (
        stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["item-2"]))
        == api_pb2.PreStartContainerResponse()
    )


@pytest.mark.parametrize(
    "call,request_message,message",
    [
        ("Allocate", api_pb2.AllocateRequest(), "no container requests"),
        (
            "Allocate",
            api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-3"])]),
            'unknown token ID "item-3"',
        ),
    ],
)
def test_refusals_are_invalid_argument_with_the_reason(
    served: Served, call: str, request_message: Message, message: str
) -> None:
    _, stub, _ = served
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, call)(request_message)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(raised.value.details())


def test_beyond_the_stream_limit_the_oldest_stream_ends(served: Served) -> None:
    _, stub, _ = served
    streams = []
    for _ in range(MAX_STREAMS + 1):  # one at a time, so the server sees them in this order
        streams.append(stub.ListAndWatch(api_pb2.Empty()))
        next(streams[-1])
    with pytest.raises(grpc.RpcError) as raised:
        next(streams[0])
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert "superseded by a newer ListAndWatch stream" in str(raised.value.details())
    allocated = stub.Allocate(
        api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["item-0"])]),
        timeout=5,
    )
    assert allocated.container_responses[0].envs["EXAMPLE_COM_TOKEN"] == "item-0"
    for stream in streams[1:]:
        stream.cancel()


@pytest.mark.parametrize(
    "method", ["Allocate", "GetPreferredAllocation", "PreStartContainer", "GetDevicePluginOptions"]
)
def test_a_malformed_request_is_invalid_argument(served: Served, socket_path: str, method: str) -> None:
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/v1beta1.DevicePlugin/{method}"
        )  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\xff\xff\xff", timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in str(raised.value.details())
