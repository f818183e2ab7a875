"""The DevicePlugin gRPC service, for any device policy.

This module knows the kubelet's protocol, not what the devices are: a `DevicePolicy` supplies
the options, the device list and the allocation decisions. A new policy is one event,
`DevicePluginServicer.set_policy`, and every open ListAndWatch stream sends its devices once.
"""

from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

import grpc
from absl import logging
from google.protobuf import message

from deviceplugin.v1beta1 import api_pb2
from token_resource import metrics
from token_resource.broadcast import Broadcast
from token_resource.policy import AllocationError, DevicePolicy

SERVICE = "v1beta1.DevicePlugin"
# Each ListAndWatch stream pins a server thread. The kubelet holds one per registration (an
# older kubelet may leave the previous one open a while), so beyond this many the oldest is
# ended: a flood of streams must never leave Allocate, which the kubelet calls without a
# deadline, waiting for a thread.
MAX_STREAMS = 4


class StreamListener(Protocol):
    """Told when a ListAndWatch stream of `servicer` opens or ends; `stream` numbers them."""

    def stream_opened(self, servicer: "DevicePluginServicer", stream: int) -> None: ...

    def stream_closed(self, servicer: "DevicePluginServicer", stream: int) -> None: ...


class _Undecodable:
    """Stands for a request that is not a valid message of its type."""


UNDECODABLE = _Undecodable()


def _lenient(parse: Callable[[bytes], message.Message]) -> Callable[[bytes], Any]:
    # grpcio keeps memory for every request its deserializer fails on; answering a malformed
    # request ourselves (INVALID_ARGUMENT) keeps the daemon's footprint flat under garbage.
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except message.DecodeError:
            return UNDECODABLE

    return deserialize


class DevicePluginServicer:
    """Serves all five DevicePlugin methods from a DevicePolicy."""

    def __init__(self, policy: DevicePolicy, listener: StreamListener) -> None:
        self._policy = policy  # replaced whole by set_policy; each call reads it once
        self._resource = policy.resource
        self._listener = listener
        self._devices = Broadcast(policy.devices(), MAX_STREAMS, "ListAndWatch stream")
        self._closed = False

    def add_to_server(self, server: grpc.Server) -> None:
        def unary(
            method: Callable[[Any, grpc.ServicerContext], message.Message], request: type[message.Message]
        ) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=_lenient(request.FromString), response_serializer=_serialize
            )

        handlers = {
            "GetDevicePluginOptions": unary(self.GetDevicePluginOptions, api_pb2.Empty),
            "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                self.ListAndWatch,
                request_deserializer=_lenient(api_pb2.Empty.FromString),
                response_serializer=_serialize,
            ),
            "GetPreferredAllocation": unary(self.GetPreferredAllocation, api_pb2.PreferredAllocationRequest),
            "Allocate": unary(self.Allocate, api_pb2.AllocateRequest),
            "PreStartContainer": unary(self.PreStartContainer, api_pb2.PreStartContainerRequest),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def set_policy(self, policy: DevicePolicy) -> None:
        """Serves `policy` from now on; its devices go out on every open stream, unless they
        equal the ones in force."""
        self._policy = policy
        self._devices.publish(policy.devices())

    def close(self) -> None:
        """Stops reporting streams to the listener: the server is going away, and stopping it
        cancels the streams (so the kubelet sees an error, never a stream that ended OK)."""
        self._closed = True

    @property
    def open_streams(self) -> int:
        return len(self._devices)

    def _count(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        metrics.CALLS.labels(self._resource, method).inc()
        if request is UNDECODABLE:
            metrics.CALL_ERRORS.labels(self._resource, method).inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request is not a valid message")

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        self._count("GetDevicePluginOptions", request, context)
        return self._policy.options()

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        self._count("ListAndWatch", request, context)
        stream = self._devices.open(context)
        if stream is None:
            return
        self._listener.stream_opened(self, stream)
        logging.vlog(1, "ListAndWatch opened")
        try:
            for snapshot in self._devices.values(stream, context):
                logging.vlog(1, "ListAndWatch: sending %d devices", len(snapshot.devices))
                yield snapshot
        finally:
            if not self._closed:
                self._listener.stream_closed(self, stream)

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        self._count("GetPreferredAllocation", request, context)
        policy = self._policy
        response = api_pb2.PreferredAllocationResponse()
        try:
            for container in request.container_requests:
                ids = policy.preferred(
                    container.available_deviceIDs,
                    container.must_include_deviceIDs,
                    container.allocation_size,
                )
                response.container_responses.add(deviceIDs=ids)
        except AllocationError as error:
            self._refuse(context, "GetPreferredAllocation", error)
        logging.vlog(1, "GetPreferredAllocation -> %s", [list(r.deviceIDs) for r in response.container_responses])
        return response

    def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> api_pb2.AllocateResponse:
        self._count("Allocate", request, context)
        if not request.container_requests:
            self._refuse(context, "Allocate", AllocationError("Allocate: the request has no container requests"))
        policy = self._policy
        response = api_pb2.AllocateResponse()
        try:
            for container in request.container_requests:
                response.container_responses.append(policy.allocate(container.devices_ids))
        except AllocationError as error:
            self._refuse(context, "Allocate", error)
        logging.vlog(1, "Allocate %s", [list(c.devices_ids) for c in request.container_requests])
        return response

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        self._count("PreStartContainer", request, context)
        logging.vlog(1, "PreStartContainer %s", list(request.devices_ids))
        return api_pb2.PreStartContainerResponse()

    def _refuse(self, context: grpc.ServicerContext, method: str, error: AllocationError) -> NoReturn:
        metrics.CALL_ERRORS.labels(self._resource, method).inc()
        logging.warning("%s: %s", self._resource, error)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def _serialize(response: message.Message) -> bytes:
    return response.SerializeToString()
