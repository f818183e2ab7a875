"""Hand-off between two instances of the plugin on one node (a surge upgrade, or a mistake).

Each instance serves on its own socket (kubelet.Endpoint.per_instance) and answers
`Handoff.Watch` there with whether the kubelet holds its registration. An older instance that
sees a newer sibling's socket follows that stream: once the newer one is registered the older
steps aside (it stops publishing and never registers again), and if the newer one goes away
the older registers at once. Newer always wins, so two instances never take turns.
"""

import threading
from collections.abc import Callable, Iterator

import grpc

from token_resource.broadcast import Broadcast
from tokenresource.handoff.v1 import api_pb2, api_pb2_grpc

# Each Watch pins a server thread, like a ListAndWatch stream; an older instance holds one. Beyond
# this many the oldest is ended, so a flood can never leave Allocate without a thread.
MAX_WATCHES = 2


class HandoffService(api_pb2_grpc.HandoffServicer):
    """This instance's side: its registration state, streamed to every watcher."""

    def __init__(self, instance: int, resource: str) -> None:
        self._instance = instance
        self._resource = resource
        self._registered = Broadcast(False, MAX_WATCHES, "Watch")

    def add_to_server(self, server: grpc.Server) -> None:
        api_pb2_grpc.add_HandoffServicer_to_server(self, server)

    def set_registered(self, registered: bool) -> None:
        self._registered.publish(registered)

    def Watch(self, request: api_pb2.WatchRequest, context: grpc.ServicerContext) -> Iterator[api_pb2.InstanceState]:
        if request.resource != self._resource:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this socket serves {self._resource}")
        watch = self._registered.open(context)
        if watch is None:
            return
        for registered in self._registered.values(watch, context):
            yield api_pb2.InstanceState(instance=self._instance, registered=registered)


class SuccessorWatch:
    """Follows a newer instance's Handoff stream on a thread: on_state(instance, registered) at
    each change, then on_gone(instance) once when the stream ends (unless closed first)."""

    def __init__(
        self,
        path: str,
        resource: str,
        instance: int,
        on_state: Callable[[int, bool], None],
        on_gone: Callable[[int], None],
    ) -> None:
        self.instance = instance
        self._on_state = on_state
        self._on_gone = on_gone
        self._closed = threading.Event()
        self._channel = grpc.insecure_channel(f"unix://{path}")
        self._call = api_pb2_grpc.HandoffStub(self._channel).Watch(
            api_pb2.WatchRequest(resource=resource), wait_for_ready=False
        )
        self._thread = threading.Thread(target=self._follow, name="handoff-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._call.cancel()
        self._thread.join()
        self._channel.close()

    def _follow(self) -> None:
        try:
            for state in self._call:
                self._on_state(self.instance, state.registered)
        except grpc.RpcError:
            pass  # gone, refused or cancelled: the same to the follower
        if not self._closed.is_set():
            self._on_gone(self.instance)
