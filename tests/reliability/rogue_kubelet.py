"""A kubelet.sock server that breaks the protocol on purpose, one Register call at a time.

`RogueKubelet(directory, behaviours)` answers the n-th Register with behaviours[n] (the last one
repeats). Each behaviour is a real misdeed over real sockets; nothing is mocked:

- OK_NO_STREAM: dial back and call GetDevicePluginOptions like a 1.25+ kubelet, answer OK,
  and never call ListAndWatch.
- CLOSE_STREAM: like a good kubelet, but close the connection as soon as the first snapshot
  arrives.
- HANG: never answer (until the kubelet goes away).
- GOOD: a well-behaved kubelet: dial back, answer OK, keep ListAndWatch open.
"""

import concurrent.futures
import enum
import os
import threading
import time
from collections.abc import Callable

import grpc

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc


class Behaviour(enum.Enum):
    OK_NO_STREAM = "OK_NO_STREAM"
    CLOSE_STREAM = "CLOSE_STREAM"
    HANG = "HANG"
    GOOD = "GOOD"


class RogueKubelet(api_pb2_grpc.RegistrationServicer):
    def __init__(self, directory: str, behaviours: list[Behaviour]) -> None:
        self.directory = directory
        self.behaviours = behaviours
        self.register_times: list[float] = []
        self.snapshots = 0
        self.open_streams = 0
        self._state = threading.Condition()
        self._channels: list[grpc.Channel] = []
        self._gone = threading.Event()
        self._server: grpc.Server | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "kubelet.sock")

    def start(self) -> None:
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        self._gone.set()
        if self._server is not None:
            self._server.stop(None).wait()
            self._server = None
        with self._state:
            channels, self._channels = self._channels, []
        for ch in channels:
            ch.close()

    def wait_until(self, predicate: Callable[["RogueKubelet"], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self._state:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"rogue kubelet: {len(self.register_times)} registrations, {self.snapshots} snapshots, "
                        f"{self.open_streams} open streams"
                    )
                self._state.wait(remaining)

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:
        with self._state:
            index = len(self.register_times)
            self.register_times.append(time.monotonic())
            self._state.notify_all()
        behaviour = self.behaviours[min(index, len(self.behaviours) - 1)]
        if behaviour is Behaviour.HANG:
            self._gone.wait()
            context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet stopped")
        ch = grpc.insecure_channel(
            f"unix://{os.path.join(self.directory, request.endpoint)}",
            options=[("grpc.default_authority", "localhost")],
        )
        with self._state:
            self._channels.append(ch)
        try:
            grpc.channel_ready_future(ch).result(timeout=10)
            api_pb2_grpc.DevicePluginStub(ch).GetDevicePluginOptions(api_pb2.Empty(), timeout=10)
        except (grpc.FutureTimeoutError, grpc.RpcError, ValueError):
            context.abort(grpc.StatusCode.UNKNOWN, "failed to dial device plugin: context deadline exceeded")
        if behaviour is not Behaviour.OK_NO_STREAM:
            threading.Thread(target=self._stream, args=(ch, behaviour), daemon=True).start()
        return api_pb2.Empty()

    def _stream(self, ch: grpc.Channel, behaviour: Behaviour) -> None:
        with self._state:
            self.open_streams += 1
            self._state.notify_all()
        try:
            for _ in api_pb2_grpc.DevicePluginStub(ch).ListAndWatch(api_pb2.Empty()):
                with self._state:
                    self.snapshots += 1
                    self._state.notify_all()
                if behaviour is Behaviour.CLOSE_STREAM:
                    ch.close()
        except (grpc.RpcError, ValueError):
            pass  # closed by us or by the plugin
        with self._state:
            self.open_streams -= 1
            self._state.notify_all()
