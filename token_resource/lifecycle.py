"""The life of one device plugin: serve, register, notice the kubelet leaving, start over.

`PluginRunner.run` is a single event loop. Everything that can happen (directory events,
ListAndWatch streams opening and closing, Register calls finishing, a stop request, a deadline)
arrives on one queue, and each event makes the loop re-check the real state: is our socket
still ours, is the kubelet there, are we registered. The loop knows nothing about what the
plugin serves; the DevicePolicy does.
"""

import concurrent.futures
import contextlib
import dataclasses
import enum
import os
import queue
import random
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping

import grpc
from absl import logging

from token_resource import kubelet, metrics
from token_resource.config import PluginConfig
from token_resource.device_plugin import DevicePluginServicer, DevicePolicy

# A stream pins a worker; leave room for overlapping streams during re-registration and for
# the unary calls, which the kubelet must never find queued behind them.
SERVER_THREADS = 16
# Clients (benchmarks, fuzzers) may send large requests; the kubelet's own are small.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
REGISTER_BACKOFF_FIRST_S = 0.5
REGISTER_BACKOFF_CAP_S = 10.0
# A kubelet stream that ends sooner than this after opening counts as a failed registration
# (back-off grows), so a kubelet that keeps dropping streams is not met with a Register loop.
STABLE_STREAM_S = 10.0


class CannotServeError(Exception):
    """The plugin cannot serve, at start or later; the message says why and what to do."""


class _Signal(enum.Enum):
    STOP = "stop"
    STREAM_OPENED = "ListAndWatch opened"
    STREAM_CLOSED = "ListAndWatch closed"
    DEVICES_CHANGED = "the policy's device list changed"


@dataclasses.dataclass(frozen=True)
class RunnerStatus:
    serving: bool
    registered: bool  # Register succeeded and the kubelet holds a ListAndWatch stream
    error: str | None = None  # why the plugin cannot serve, once it has given up


@dataclasses.dataclass(frozen=True)
class _StreamEvent:
    signal: _Signal
    servicer: DevicePluginServicer  # events of a server since replaced are stale
    stream: int


@dataclasses.dataclass(frozen=True)
class _RegisterDone:
    future: "grpc.Future"


@dataclasses.dataclass
class _Server:
    grpc_server: grpc.Server
    servicer: DevicePluginServicer
    inode: tuple[int, int] | None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _identity(path: str) -> tuple[int, int, int] | None:
    """Which file `path` is: inode numbers are reused at once, so the change time counts too."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class PluginRunner:
    """Serves one DevicePolicy on one socket and keeps it registered with the kubelet."""

    def __init__(self, config: PluginConfig, policy: DevicePolicy, list_and_watch_timeout_s: float = 20.0) -> None:
        self.config = config
        self._policy = policy
        self._list_and_watch_timeout_s = list_and_watch_timeout_s
        self._events: queue.Queue = queue.Queue()
        self._server: _Server | None = None
        self._pending: grpc.Future | None = None
        self._want_register = True
        self._next_attempt = 0.0
        self._failures = 0
        self._list_and_watch_deadline: float | None = None
        self._waiting_logged = False
        # The kubelet's stream: the first one opened since the latest Register attempt. Only its
        # end means the kubelet let go; other streams (an older kubelet's, a tool's) do not.
        self._kubelet_stream: tuple[DevicePluginServicer, int] | None = None
        self._kubelet_stream_opened = 0.0
        self._stream_since_attempt = False
        self._attempted_kubelet: tuple[int, int, int] | None = None  # kubelet.sock of the last attempt

    # Thread-safe entry points -------------------------------------------------------------

    def stop(self) -> None:
        self._events.put(_Signal.STOP)

    def stream_opened(self, servicer: DevicePluginServicer, stream: int) -> None:
        self._events.put(_StreamEvent(_Signal.STREAM_OPENED, servicer, stream))

    def stream_closed(self, servicer: DevicePluginServicer, stream: int) -> None:
        self._events.put(_StreamEvent(_Signal.STREAM_CLOSED, servicer, stream))

    def devices_changed(self) -> None:
        """The policy's device list changed: send it to the kubelet."""
        self._events.put(_Signal.DEVICES_CHANGED)

    def status(self) -> RunnerStatus:
        server = self._server
        streams = server.servicer.open_streams if server is not None else 0
        registered = not self._want_register and self._pending is None and streams > 0
        return RunnerStatus(serving=server is not None, registered=registered)

    # The loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Runs until stop(); raises CannotServeError if the plugin cannot serve."""
        self._start_server()
        watch = self._watch_directory()
        try:
            while True:
                self._converge()
                try:
                    event = self._events.get(timeout=self._timeout())
                except queue.Empty:
                    event = None
                if event is _Signal.STOP:
                    return
                self._handle(event)
        finally:
            if self._pending is not None:
                self._pending.cancel()
            watch.close()
            self._stop_server()
            logging.info("%s: stopped", self.config.resource)

    def _watch_directory(self) -> kubelet.DirectoryWatch:
        try:
            return kubelet.DirectoryWatch(self.config.plugin_dir, self.config.socket, self._events.put)
        except OSError as error:
            self._stop_server()
            raise CannotServeError(f"cannot watch {self.config.plugin_dir}: {error.strerror}") from None

    def _timeout(self) -> float | None:
        """Seconds until the loop has something to do by itself, or None to wait for events."""
        deadlines = []
        if self._list_and_watch_deadline is not None:
            deadlines.append(self._list_and_watch_deadline)
        if self._want_register and self._pending is None:
            deadlines.append(self._next_attempt)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _converge(self) -> None:
        """Acts on the real state: our socket, the kubelet's socket, the registration."""
        server = self._server
        if server is None or server.inode is None or _inode(self.config.socket_path) != server.inode:
            if server is not None:
                logging.info("%s: plugin socket removed (kubelet restart); serving again", self.config.resource)
                metrics.KUBELET_RESTARTS.labels(self.config.resource).inc()
            self._stop_server()
            self._start_server()
            self._want_register = True
            self._restart_backoff()
        now = time.monotonic()
        if self._list_and_watch_deadline is not None and now >= self._list_and_watch_deadline:
            logging.warning(
                "%s: the kubelet did not call ListAndWatch within %.0f s of registering; registering again",
                self.config.resource,
                self._list_and_watch_timeout_s,
            )
            self._list_and_watch_deadline = None
            self._want_register = True
        if self._want_register and self._pending is None and now >= self._next_attempt:
            self._attempt_register()

    def _handle(self, event: object) -> None:
        if event is kubelet.DirectoryEvent.KUBELET_SOCKET_CREATED:
            # Level-triggered: an attempt already made to this very kubelet.sock stands, so a
            # restart seen both as a closed stream and as a new socket registers only once.
            if _identity(self.config.kubelet_socket_path) != self._attempted_kubelet:
                logging.info("%s: kubelet.sock created (kubelet restart); registering again", self.config.resource)
                self._reregister(back_off=False)
        elif event is kubelet.DirectoryEvent.DIRECTORY_REMOVED:
            raise CannotServeError(f"the device-plugin directory {self.config.plugin_dir} was removed")
        elif event is _Signal.DEVICES_CHANGED:
            snapshot = self._policy.devices()
            metrics.TOKENS.labels(self.config.resource).set(len(snapshot.devices))
            if self._server is not None:
                self._server.servicer.publish(snapshot)
        elif isinstance(event, _StreamEvent) and self._server is not None and event.servicer is self._server.servicer:
            stream = (event.servicer, event.stream)
            if event.signal is _Signal.STREAM_OPENED and not self._stream_since_attempt:
                self._list_and_watch_deadline = None
                self._stream_since_attempt = True
                self._kubelet_stream, self._kubelet_stream_opened = stream, time.monotonic()
                logging.info("%s: kubelet opened ListAndWatch", self.config.resource)
            elif event.signal is _Signal.STREAM_CLOSED and stream == self._kubelet_stream:
                self._kubelet_stream = None
                lived = time.monotonic() - self._kubelet_stream_opened
                logging.info(
                    "%s: the kubelet's ListAndWatch stream ended after %.1f s; registering again",
                    self.config.resource,
                    lived,
                )
                self._reregister(back_off=lived < STABLE_STREAM_S)
        elif isinstance(event, _RegisterDone) and event.future is self._pending:
            self._pending = None
            self._registration_finished(event.future)
        # SOCKET_REMOVED needs no handling here: _converge compares the socket's inode.

    # Registration ---------------------------------------------------------------------------

    def _reregister(self, back_off: bool) -> None:
        """Registers again: at once, or after the next back-off step when the previous
        registration did not hold."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._list_and_watch_deadline = None
        self._want_register = True
        if back_off:
            self._back_off()
        else:
            self._restart_backoff()

    def _restart_backoff(self) -> None:
        self._failures = 0
        self._next_attempt = 0.0

    def _attempt_register(self) -> None:
        if not os.path.exists(self.config.kubelet_socket_path):
            if not self._waiting_logged:
                logging.info("%s: waiting for %s", self.config.resource, self.config.kubelet_socket_path)
                self._waiting_logged = True
            self._back_off()  # the CREATE event normally comes first; this covers a missed one
            return
        self._waiting_logged = False
        self._attempted_kubelet = _identity(self.config.kubelet_socket_path)
        future = kubelet.register(
            self.config.kubelet_socket_path,
            self.config.socket,
            self.config.resource,
            self._policy.options(),
        )
        self._pending = future
        self._stream_since_attempt = False
        future.add_done_callback(lambda done: self._events.put(_RegisterDone(done)))

    def _registration_finished(self, future: "grpc.Future") -> None:
        try:
            future.result()
        except grpc.FutureCancelledError:
            return
        except grpc.RpcError as error:
            metrics.REGISTRATION_FAILURES.labels(self.config.resource).inc()
            delay = self._back_off()
            logging.warning(
                "%s: Register failed (%s); retrying in %.1f s",
                self.config.resource,
                kubelet.describe_rpc_error(error),
                delay,
            )
            return
        metrics.REGISTRATIONS.labels(self.config.resource).inc()
        self._want_register = False  # the back-off resets only once the kubelet's stream holds
        if not self._stream_since_attempt:  # E2 kubelets often open it before Register returns
            self._list_and_watch_deadline = time.monotonic() + self._list_and_watch_timeout_s
        logging.info(
            "%s: registered with the kubelet as %s (%d devices)",
            self.config.resource,
            self.config.socket,
            len(self._policy.devices().devices),
        )

    def _back_off(self) -> float:
        """Capped exponential back-off with jitter, so restarted nodes do not retry in step."""
        ceiling = min(REGISTER_BACKOFF_CAP_S, REGISTER_BACKOFF_FIRST_S * 2**self._failures)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        self._failures += 1
        self._next_attempt = time.monotonic() + delay
        return delay

    # The gRPC server -----------------------------------------------------------------------

    def _check_directory(self) -> None:
        if not os.path.isdir(self.config.plugin_dir):
            raise CannotServeError(
                f"the device-plugin directory {self.config.plugin_dir} does not exist "
                "(is the kubelet's directory mounted? see --plugin_dir)"
            )

    def _start_server(self) -> None:
        path = self.config.socket_path
        self._check_directory()
        _claim_socket(path)
        servicer = DevicePluginServicer(self._policy, self, self.config.resource)
        metrics.TOKENS.labels(self.config.resource).set(len(self._policy.devices().devices))
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)],
        )
        servicer.add_to_server(server)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError:
            self._check_directory()  # it may have gone meanwhile: say so rather than guess
            raise CannotServeError(f"cannot create the socket {path}: is {self.config.plugin_dir} writable?") from None
        server.start()
        # None if the kubelet deleted the socket at once (it was starting): the loop serves again.
        self._server = _Server(server, servicer, _inode(path))
        logging.info("%s: serving on %s", self.config.resource, path)

    def _stop_server(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.servicer.close()
        server.grpc_server.stop(grace=None)
        # Remove the socket only if it is still the one we created: never the kubelet's, and
        # never a newer instance's.
        if _inode(self.config.socket_path) == server.inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket_path)


def _claim_socket(path: str) -> None:
    """Removes a stale socket left by a crashed run; refuses to take over a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CannotServeError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        logging.info("removing stale socket %s left by an earlier run", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise CannotServeError(f"another process is serving on {path}; stop it or give this one another --socket")


def handle_signals(handlers: Mapping[signal.Signals, Callable[[], None]]) -> None:
    """Runs handlers[signum]() on a helper thread as each signal arrives.

    Python runs signal handlers only in the main thread, between bytecodes; when the signal lands
    on one of gRPC's threads while the main thread sleeps on a lock, the handler waits. The
    interpreter's C-level handler writes the signal number to the wakeup fd at once, whichever
    thread takes it, so a thread reading that fd reacts immediately. Call from the main thread.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in handlers:
        signal.signal(signum, lambda *_: None)  # the work happens on the helper thread

    def dispatch() -> None:
        while True:
            for signum in os.read(read_fd, 64):
                handler = handlers.get(signal.Signals(signum))
                if handler is not None:
                    handler()

    threading.Thread(target=dispatch, name="signals", daemon=True).start()
