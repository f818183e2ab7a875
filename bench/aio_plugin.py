"""Benchmark-only prototype: the daemon's serving path on grpc.aio, one asyncio loop, no threads of its own.

Used by threads_vs_asyncio.py to decide issue 10 (threads or asyncio) with numbers; it is not
the daemon and is not shipped. It serves what the daemon serves, so the comparison is fair:

* the real policy (token_resource.tokens.TokenPolicy), the same resources and sockets from
  the same flags or --config file (token_resource.config), the per-instance socket name, bound
  under its staging name and renamed into place (plugin_server.PluginServer);
* all five DevicePlugin methods with the daemon's lenient decoding, refusals and metrics
  (token_resource.metrics), and the Handoff service on the same socket;
* ListAndWatch as an async generator woken by an asyncio.Condition on a policy change (SIGHUP,
  or the --config file changing), with the daemon's cap of device_plugin.MAX_STREAMS (the
  oldest ends with ABORTED). A cancelled RPC cancels the coroutine: no is_active() polling
  and no add_callback wake-up;
* Register with the kubelet (1.25+ dials back while Register is in flight: same loop), again
  when the kubelet's stream ends or a new kubelet.sock appears, with capped back-off;
* directory and config-file events from one inotify descriptor on the loop (add_reader), and
  SIGTERM/SIGINT/SIGHUP through loop.add_signal_handler: no watcher, runner or signal thread.

Not ported (no effect on the measured figures; the threads design does not exercise them in
the benchmark either): the hand-off state machine (standby, following a newer instance), the
kubelet's-stream deadline, drain on stop, and /healthz.

    python bench/aio_plugin.py --plugin_dir=/tmp/x --count=1000
    python bench/aio_plugin.py --plugin_dir=/tmp/x --config=/tmp/x/config.yaml
"""

import asyncio
import contextlib
import functools
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc
import inotify_simple
import yaml
from absl import app, flags, logging
from google.protobuf import message

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from token_resource import config, kubelet, metrics, tokens
from token_resource.device_plugin import MAX_STREAMS, SERVICE, UNDECODABLE, _lenient, _serialize
from token_resource.kubelet import DirectoryEvent, Endpoint
from token_resource.plugin_server import MAX_RECEIVE_BYTES
from token_resource.policy import AllocationError, DevicePolicy
from tokenresource.handoff.v1 import api_pb2 as handoff_pb2
from tokenresource.handoff.v1 import api_pb2_grpc as handoff_pb2_grpc

FLAGS = flags.FLAGS
flags.DEFINE_integer("count", 1, "Number of tokens advertised on this node.")
flags.DEFINE_string("resource", "example.com/token", "Extended resource name, domain/name.")
flags.DEFINE_string("plugin_dir", config.DEFAULT_PLUGIN_DIR, "The kubelet's device-plugin directory.")
flags.DEFINE_string("config", None, "YAML or JSON file declaring one or more resources (as the daemon's --config).")
flags.DEFINE_string("node_name", os.environ.get("NODE_NAME"), "This node's name, for per-node counts.")

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 10.0


class AioDevicePlugin:
    """device_plugin.DevicePluginServicer on grpc.aio: the same answers, coroutines for threads."""

    def __init__(self, policy: DevicePolicy, on_stream: Callable[["AioDevicePlugin", int, bool], None]) -> None:
        self._policy = policy
        self._resource = policy.resource
        self._on_stream = on_stream  # (servicer, stream, opened)
        self._changed = asyncio.Condition()
        self._snapshot = policy.devices()
        self._generation = 0
        self._streams: list[int] = []
        self._next_stream = 0
        self.closed = False

    def handlers(self) -> grpc.GenericRpcHandler:
        def unary(method: Callable[..., Any], request: type[message.Message]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=_lenient(request.FromString), response_serializer=_serialize
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetDevicePluginOptions": unary(self.GetDevicePluginOptions, api_pb2.Empty),
                "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                    self.ListAndWatch,
                    request_deserializer=_lenient(api_pb2.Empty.FromString),
                    response_serializer=_serialize,
                ),
                "GetPreferredAllocation": unary(self.GetPreferredAllocation, api_pb2.PreferredAllocationRequest),
                "Allocate": unary(self.Allocate, api_pb2.AllocateRequest),
                "PreStartContainer": unary(self.PreStartContainer, api_pb2.PreStartContainerRequest),
            },
        )

    async def set_policy(self, policy: DevicePolicy) -> None:
        snapshot = policy.devices()
        async with self._changed:
            self._policy = policy
            if snapshot == self._snapshot:
                return
            self._snapshot = snapshot
            self._generation += 1
            self._changed.notify_all()

    async def _count(self, method: str, request: object, context: grpc.aio.ServicerContext) -> None:
        metrics.CALLS.labels(self._resource, method).inc()
        if request is UNDECODABLE:
            metrics.CALL_ERRORS.labels(self._resource, method).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request is not a valid message")

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        await self._count("GetDevicePluginOptions", request, context)
        return self._policy.options()

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        await self._count("ListAndWatch", request, context)
        async with self._changed:
            stream = self._next_stream
            self._next_stream += 1
            self._streams.append(stream)
            if len(self._streams) > MAX_STREAMS:
                self._streams.pop(0)  # the oldest ends at its next wake-up
                self._changed.notify_all()
        self._on_stream(self, stream, True)
        logging.vlog(1, "ListAndWatch opened")
        try:
            sent = -1
            while True:
                async with self._changed:
                    await self._changed.wait_for(functools.partial(self._news_for, stream, sent))
                    if stream not in self._streams:
                        await context.abort(grpc.StatusCode.ABORTED, "superseded by a newer ListAndWatch stream")
                    sent, snapshot = self._generation, self._snapshot
                logging.vlog(1, "ListAndWatch: sending %d devices", len(snapshot.devices))
                yield snapshot
        finally:  # also when the client cancels: grpc.aio cancels this coroutine
            if stream in self._streams:
                self._streams.remove(stream)
            if not self.closed:
                self._on_stream(self, stream, False)

    def _news_for(self, stream: int, sent: int) -> bool:
        return stream not in self._streams or self._generation != sent

    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        await self._count("GetPreferredAllocation", request, context)
        policy = self._policy
        response = api_pb2.PreferredAllocationResponse()
        try:
            for container in request.container_requests:
                ids = policy.preferred(
                    container.available_deviceIDs, container.must_include_deviceIDs, container.allocation_size
                )
                response.container_responses.add(deviceIDs=ids)
        except AllocationError as error:
            await self._refuse(context, "GetPreferredAllocation", error)
        logging.vlog(1, "GetPreferredAllocation -> %s", [list(r.deviceIDs) for r in response.container_responses])
        return response

    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.AllocateResponse:
        await self._count("Allocate", request, context)
        if not request.container_requests:
            await self._refuse(context, "Allocate", AllocationError("Allocate: the request has no container requests"))
        policy = self._policy
        response = api_pb2.AllocateResponse()
        try:
            for container in request.container_requests:
                response.container_responses.append(policy.allocate(container.devices_ids))
        except AllocationError as error:
            await self._refuse(context, "Allocate", error)
        logging.vlog(1, "Allocate %s", [list(c.devices_ids) for c in request.container_requests])
        return response

    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        await self._count("PreStartContainer", request, context)
        return api_pb2.PreStartContainerResponse()

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, error: AllocationError) -> None:
        metrics.CALL_ERRORS.labels(self._resource, method).inc()
        logging.warning("%s: %s", self._resource, error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


class AioHandoff(handoff_pb2_grpc.HandoffServicer):
    """handoff.HandoffService on grpc.aio."""

    def __init__(self, instance: int, resource: str) -> None:
        self._instance = instance
        self._resource = resource
        self._changed = asyncio.Condition()
        self._registered = False
        self._generation = 0

    async def set_registered(self, registered: bool) -> None:
        async with self._changed:
            if registered != self._registered:
                self._registered = registered
                self._generation += 1
                self._changed.notify_all()

    async def Watch(
        self, request: handoff_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[handoff_pb2.InstanceState]:
        if request.resource != self._resource:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this socket serves {self._resource}")
        sent = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._news, sent))
                sent, registered = self._generation, self._registered
            yield handoff_pb2.InstanceState(instance=self._instance, registered=registered)

    def _news(self, sent: int) -> bool:
        return self._generation != sent


class Inotify:
    """One inotify descriptor read on the loop: subscribers get (name, mask) for their directory."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inotify = inotify_simple.INotify()
        self._subscribers: dict[int, list[Callable[[str, int], None]]] = {}
        self._loop = loop
        loop.add_reader(self._inotify.fileno(), self._read)

    def subscribe(self, directory: str, mask: int, on_event: Callable[[str, int], None]) -> None:
        wd = self._inotify.add_watch(directory, mask | inotify_simple.flags.MASK_ADD)
        self._subscribers.setdefault(wd, []).append(on_event)

    def _read(self) -> None:
        for event in self._inotify.read(timeout=0):
            for on_event in self._subscribers.get(event.wd, ()):
                on_event(event.name, event.mask)

    def close(self) -> None:
        self._loop.remove_reader(self._inotify.fileno())
        self._inotify.close()


class AioRunner:
    """Serves one resource and keeps it registered: lifecycle.PluginRunner's main path, on the loop."""

    def __init__(self, endpoint: Endpoint, policy: DevicePolicy, instance: int) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.instance = instance
        self.socket = endpoint.socket_name(instance)
        self.path = os.path.join(endpoint.plugin_dir, self.socket)
        self._resource = endpoint.resource
        self.servicer: AioDevicePlugin | None = None
        self.handoff = AioHandoff(instance, endpoint.resource)
        self._server: grpc.aio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._wanted = asyncio.Event()  # register (again)
        self._registering = False
        self._kubelet_stream: tuple[AioDevicePlugin, int] | None = None
        self._failures = 0
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def start(self) -> None:
        await self._serve()
        self._task = asyncio.get_running_loop().create_task(self._register_loop())

    async def _serve(self) -> None:
        old = self._server
        servicer = AioDevicePlugin(self.policy, self._stream_event)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
        server.add_generic_rpc_handlers((servicer.handlers(),))
        handoff_pb2_grpc.add_HandoffServicer_to_server(self.handoff, server)
        staging = os.path.join(self.endpoint.plugin_dir, kubelet.staging_name(self.socket))
        server.add_insecure_port(f"unix:{staging}")
        await server.start()
        os.rename(staging, self.path)
        st = os.lstat(self.path)
        self._server, self.servicer, self._inode = server, servicer, (st.st_dev, st.st_ino)
        metrics.TOKENS.labels(self._resource).set(len(self.policy.devices().devices))
        logging.info("%s: serving on %s", self._resource, self.path)
        if old is not None:
            await old.stop(None)

    def _owns_socket(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def _stream_event(self, servicer: AioDevicePlugin, stream: int, opened: bool) -> None:
        if servicer is not self.servicer:
            return  # a replaced server's stream
        if opened and self._kubelet_stream is None and self._registering:
            # The first stream since our Register (1.25+ opens it before Register returns).
            self._kubelet_stream, self._registering = (servicer, stream), False
            logging.info("%s: kubelet opened ListAndWatch", self._resource)
        elif not opened and self._kubelet_stream == (servicer, stream):
            logging.info("%s: the kubelet's ListAndWatch stream ended; registering again", self._resource)
            self._kubelet_stream = None
            self._wanted.set()

    def directory_changed(self, name: str, mask: int) -> None:
        if kubelet.classify(name, mask) is DirectoryEvent.KUBELET_SOCKET_CREATED:
            task = asyncio.get_running_loop().create_task(self._kubelet_restarted())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _kubelet_restarted(self) -> None:
        if not self._owns_socket():
            logging.info("%s: plugin socket removed (kubelet restart); serving again", self._resource)
            metrics.KUBELET_RESTARTS.labels(self._resource).inc()
            await self._serve()
        self._failures = 0
        self._wanted.set()

    async def set_policy(self, policy: DevicePolicy) -> None:
        self.policy = policy
        metrics.TOKENS.labels(self._resource).set(len(policy.devices().devices))
        if self.servicer is not None:
            await self.servicer.set_policy(policy)

    async def _register_loop(self) -> None:
        self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.handoff.set_registered(False)
            self._registering, self._kubelet_stream = True, None
            try:
                if not await self._register():
                    self._registering = False
                    continue  # the inotify CREATE of kubelet.sock sets _wanted again
            except grpc.RpcError as error:
                metrics.REGISTRATION_FAILURES.labels(self._resource).inc()
                delay = self._back_off()
                logging.warning(
                    "%s: Register failed (%s); retrying in %.1f s",
                    self._resource,
                    kubelet.describe_rpc_error(error),
                    delay,
                )
                self._registering = False
                asyncio.get_running_loop().call_later(delay, self._wanted.set)
                continue
            except BaseException:
                self._registering = False
                raise
            self._failures = 0
            metrics.REGISTRATIONS.labels(self._resource).inc()
            metrics.REGISTERED.labels(self._resource).set(1)
            await self.handoff.set_registered(True)
            logging.info(
                "%s: registered with the kubelet as %s (%d devices)",
                self._resource,
                self.socket,
                len(self.policy.devices().devices),
            )

    async def _register(self) -> bool:
        """Register with the kubelet; False if there is no kubelet.sock yet."""
        if not os.path.exists(self.endpoint.kubelet_socket_path):
            logging.info("%s: waiting for %s", self._resource, self.endpoint.kubelet_socket_path)
            return False
        request = api_pb2.RegisterRequest(
            version=kubelet.API_VERSION,
            endpoint=self.socket,
            resource_name=self._resource,
            options=self.policy.options(),
        )
        async with grpc.aio.insecure_channel(f"unix://{self.endpoint.kubelet_socket_path}") as channel:
            await api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=kubelet.REGISTER_TIMEOUT_S)
        return True

    def _back_off(self) -> float:
        step = self._failures - 1
        self._failures += 1
        if step < 0:
            return 0.0
        ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**step)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.servicer is not None:
            self.servicer.closed = True
        if self._server is not None:
            await self._server.stop(None)
        if self._owns_socket():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        logging.info("%s: stopped", self._resource)


def _plugins() -> tuple[tuple[str, int, Endpoint], ...]:
    """(resource, count, endpoint) from the flags or the --config file's name and count keys (the
    daemon's per-node counts and socket overrides are not needed here)."""
    plugin_dir = os.path.abspath(FLAGS.plugin_dir)
    if FLAGS.config is None:
        entries = [{"name": FLAGS.resource, "count": FLAGS.count}]
    else:
        with open(FLAGS.config, encoding="utf-8") as f:
            document = yaml.safe_load(f)
        if not isinstance(document, dict) or not isinstance(document.get("resources"), list):
            raise config.ConfigError('expected a mapping with a list under "resources"')
        entries = document["resources"]
    plugins = []
    for entry in entries:
        name, count = entry["name"], entry.get("count", 1)
        config.check_resource_name(name)
        config.check_count(count)
        plugins.append((name, count, Endpoint(name, config.default_socket(name), plugin_dir, True)))
    return tuple(plugins)


def _fan_out(subscribers: Sequence[Callable[[str, int], None]], name: str, mask: int) -> None:
    for on_event in subscribers:
        on_event(name, mask)


async def serve(plugins: tuple[tuple[str, int, Endpoint], ...]) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    tasks: set[asyncio.Task] = set()  # reloads in flight (the loop keeps only weak references)

    def spawn(coroutine: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    instance = time.time_ns()
    runners = {
        name: AioRunner(endpoint, tokens.TokenPolicy(name, count), instance) for name, count, endpoint in plugins
    }
    inotify = Inotify(loop)
    for directory in {endpoint.plugin_dir for _, _, endpoint in plugins}:
        subscribers = [r.directory_changed for r in runners.values() if r.endpoint.plugin_dir == directory]
        inotify.subscribe(directory, kubelet.DIRECTORY_MASK, functools.partial(_fan_out, subscribers))

    async def reload() -> None:
        try:
            fresh = _plugins()
        except (config.ConfigError, OSError, KeyError, TypeError) as error:
            logging.error("reload failed: %s", error)
            return
        for name, count, _ in fresh:
            runner = runners.get(name)
            if runner is not None and isinstance(runner.policy, tokens.TokenPolicy):
                await runner.set_policy(runner.policy.reconfigured(count))
        logging.info("configuration reloaded")

    if FLAGS.config is not None:
        config_path = os.path.abspath(FLAGS.config)

        def config_changed(name: str, mask: int) -> None:
            if name == os.path.basename(config_path):
                spawn(reload())

        inotify.subscribe(
            os.path.dirname(config_path),
            inotify_simple.flags.CLOSE_WRITE | inotify_simple.flags.MOVED_TO,
            config_changed,
        )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload()))
    for runner in runners.values():
        await runner.start()
    logging.info("aio prototype: %s", ", ".join(f"{count} x {name}" for name, count, _ in plugins))
    await stopping.wait()
    for runner in runners.values():
        await runner.stop()
    inotify.close()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        plugins = _plugins()
    except (config.ConfigError, OSError, KeyError, TypeError) as error:
        print(f"aio_plugin: {error}", file=sys.stderr)
        return 1
    asyncio.run(serve(plugins))
    return 0


if __name__ == "__main__":
    app.run(main)
