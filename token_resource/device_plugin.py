"""The DevicePlugin gRPC service, for any device policy.

This module knows the kubelet's protocol, not what the devices are: a `DevicePolicy` supplies
the options, the device list and the allocation decisions. A new device list is one event,
`DevicePluginServicer.publish`, and every open ListAndWatch stream sends it once.
"""

import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import grpc
from absl import logging

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from token_resource import metrics


class AllocationError(Exception):
    """A request the policy refuses; answered with INVALID_ARGUMENT and this message."""


class DevicePolicy(Protocol):
    def options(self) -> api_pb2.DevicePluginOptions: ...

    def devices(self) -> api_pb2.ListAndWatchResponse: ...

    def allocate(self, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse: ...

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]: ...


class StreamListener(Protocol):
    """Told when the kubelet opens or loses a ListAndWatch stream."""

    def stream_opened(self) -> None: ...

    def stream_closed(self, remaining: int) -> None: ...


class DevicePluginServicer(api_pb2_grpc.DevicePluginServicer):
    """Serves all five DevicePlugin methods from a DevicePolicy."""

    def __init__(self, policy: DevicePolicy, listener: StreamListener, resource: str) -> None:
        self._policy = policy
        self._resource = resource
        self._listener = listener
        self._changed = threading.Condition()
        self._snapshot = policy.devices()
        self._generation = 0
        self._open_streams = 0
        self._closed = False

    def publish(self, snapshot: api_pb2.ListAndWatchResponse) -> None:
        """Sends `snapshot` on every open stream, unless it equals the one in force."""
        with self._changed:
            if snapshot == self._snapshot:
                return
            self._snapshot = snapshot
            self._generation += 1
            self._changed.notify_all()

    def close(self) -> None:
        """Stops reporting streams to the listener: the server is going away, and stopping it
        cancels the streams (so the kubelet sees an error, never a stream that ended OK)."""
        with self._changed:
            self._closed = True

    @property
    def open_streams(self) -> int:
        with self._changed:
            return self._open_streams

    def _count(self, method: str) -> None:
        metrics.CALLS.labels(self._resource, method).inc()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        self._count("GetDevicePluginOptions")
        return self._policy.options()

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        # Each stream pins a server thread; the callback wakes it when the kubelet goes away.
        self._count("ListAndWatch")
        if not context.add_callback(self._wake):
            return
        with self._changed:
            self._open_streams += 1
        self._listener.stream_opened()
        logging.vlog(1, "ListAndWatch opened")
        try:
            sent = -1
            while True:
                with self._changed:
                    self._changed.wait_for(functools.partial(self._news_for, context, sent))
                    if not context.is_active():
                        return
                    sent, snapshot = self._generation, self._snapshot
                logging.vlog(1, "ListAndWatch: sending %d devices", len(snapshot.devices))
                yield snapshot
        finally:
            with self._changed:
                self._open_streams -= 1
                remaining = self._open_streams
            if not self._closed:
                self._listener.stream_closed(remaining)

    def _news_for(self, context: grpc.ServicerContext, sent: int) -> bool:
        """Whether a stream that sent generation `sent` has something to do (lock held)."""
        return not context.is_active() or self._generation != sent

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        self._count("GetPreferredAllocation")
        response = api_pb2.PreferredAllocationResponse()
        try:
            for container in request.container_requests:
                ids = self._policy.preferred(
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
        self._count("Allocate")
        if not request.container_requests:
            self._refuse(context, "Allocate", AllocationError("Allocate: the request has no container requests"))
        response = api_pb2.AllocateResponse()
        try:
            for container in request.container_requests:
                response.container_responses.append(self._policy.allocate(container.devices_ids))
        except AllocationError as error:
            self._refuse(context, "Allocate", error)
        logging.vlog(1, "Allocate %s", [list(c.devices_ids) for c in request.container_requests])
        return response

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        self._count("PreStartContainer")
        logging.vlog(1, "PreStartContainer %s", list(request.devices_ids))
        return api_pb2.PreStartContainerResponse()

    def _refuse(self, context: grpc.ServicerContext, method: str, error: AllocationError) -> None:
        metrics.CALL_ERRORS.labels(self._resource, method).inc()
        logging.warning("%s: %s", self._resource, error)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
