"""The life of one device plugin, as a state machine: serve, register, hold the kubelet's
ListAndWatch stream, start over when the kubelet goes, step aside for a newer instance.

    UNSERVED ──serve──▶ REGISTERING ──Register ok──▶ AWAITING_STREAM ──ListAndWatch──▶ REGISTERED
       ▲   (socket busy,   ▲  ▲ Register failed,                │ none in time            │
       │    no directory)  │  └ back-off ◀───────────────────────┘                         │
       │                   └──────── the kubelet's stream ended / kubelet.sock re-created ──┘
       └─ the directory went away                 a newer instance registered ─▶ STANDBY
                                                  it went away ─▶ REGISTERING (at once)

`PluginRunner.run` is a single event loop on its own thread. Everything that happens (directory
events, ListAndWatch streams opening and closing, Register calls finishing, a newer instance's
state, a new policy, a stop request) arrives on one queue as an event object, and `handle`
dispatches it by type; then `_converge` acts on the real state (is our socket still ours, is a
deadline due). Time, the Register call and the directory watch are passed in, so tests drive
the machine event by event with a fake clock. The runner knows nothing about what the plugin
serves; the DevicePolicy does.
"""

import dataclasses
import enum
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import grpc
from absl import logging

from token_resource import kubelet, metrics, watch
from token_resource.backoff import Backoff
from token_resource.device_plugin import DevicePluginServicer
from token_resource.handoff import HandoffService
from token_resource.kubelet import DirectoryEvent, Endpoint, Registration
from token_resource.plugin_server import CannotServeError, PluginServer
from token_resource.policy import DevicePolicy
from token_resource.siblings import Siblings

# A kubelet stream that ends sooner than this after opening counts as a failed registration
# (back-off grows), so a kubelet that keeps dropping streams is not met with a Register loop.
STABLE_STREAM_S = 10.0
# Plugin watcher: how long to wait to be found (GetInfo) before re-creating the socket. Longer
# than a kubelet start (~6 s on 1.20), after which the kubelet walks the registry directory.
WATCHER_TIMEOUT_S = 30.0


class Phase(enum.Enum):
    UNSERVED = "not serving; retrying"
    REGISTERING = "serving; registering with the kubelet"
    AWAITING_STREAM = "registered; waiting for the kubelet's ListAndWatch"
    REGISTERED = "registered; the kubelet holds the ListAndWatch stream"
    STANDBY = "standby; a newer instance holds the registration"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class RunnerStatus:
    """What /healthz, /readyz and the metrics read: published whole after every event."""

    phase: Phase
    socket: str | None = None
    problem: str | None = None  # why it cannot serve, while it retries
    successor: int | None = None  # the newer instance it follows, if any

    @property
    def registered(self) -> bool:
        return self.phase is Phase.REGISTERED

    @property
    def ready(self) -> bool:
        """The resource is served to the kubelet: by this instance, or by a newer one."""
        return self.phase in (Phase.REGISTERED, Phase.STANDBY)


# Events --------------------------------------------------------------------------------------
# Immutable values the runner matches by type. NamedTuples rather than frozen dataclasses:
# defining eleven of those cost ~8 ms of the daemon's start-up (BENCHMARKS.md, "Start-up").
# No event is compared with another (two NamedTuples with equal fields are equal).


class Stop(NamedTuple):
    pass


class DirectoryChanged(NamedTuple):
    name: str
    mask: int


class StreamOpened(NamedTuple):
    servicer: DevicePluginServicer  # events of a server since replaced are stale
    stream: int


class StreamClosed(NamedTuple):
    servicer: DevicePluginServicer
    stream: int


class RegisterDone(NamedTuple):
    future: Any  # grpc.Future, or any future with cancelled() and result()


class PolicyChanged(NamedTuple):
    policy: DevicePolicy
    taken: threading.Event | None = None  # set once the runner serves it (see Supervisor)


class SuccessorState(NamedTuple):
    instance: int
    registered: bool


class SuccessorGone(NamedTuple):
    instance: int


class InfoRequested(NamedTuple):
    """The plugin watcher asked for GetInfo: the kubelet is registering this socket."""


class RegistrationStatus(NamedTuple):
    """The plugin watcher's NotifyRegistrationStatus."""

    registered: bool
    error: str


Event = (
    Stop
    | DirectoryChanged
    | StreamOpened
    | StreamClosed
    | RegisterDone
    | PolicyChanged
    | SuccessorState
    | SuccessorGone
    | InfoRequested
    | RegistrationStatus
)

RegisterCall = Callable[[str, str, str, Any], Any]


class PluginRunner:
    """Serves one DevicePolicy on one socket and keeps it registered with the kubelet."""

    def __init__(
        self,
        endpoint: Endpoint,
        policy: DevicePolicy,
        *,
        instance: int,
        watcher: watch.Watcher | None = None,
        list_and_watch_timeout_s: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        register: RegisterCall = kubelet.register,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.instance = instance
        self.socket = endpoint.socket_name(instance)
        self.policy = policy
        self._resource = endpoint.resource
        self._socket_path = os.path.join(endpoint.socket_dir, self.socket)
        self._watcher_mode = endpoint.registration is Registration.PLUGIN_WATCHER
        self._watcher = watcher
        self._subscription: watch.Subscription | None = None
        self._list_and_watch_timeout_s = list_and_watch_timeout_s
        self._now = clock
        self._register = register
        self._backoff = Backoff(rng or random.Random())
        self._events: queue.Queue[Event] = queue.Queue()

        self.phase = Phase.UNSERVED
        self.server: PluginServer | None = None
        self._problem: str | None = None
        self._pending: Any = None  # the Register call in flight
        self._next_attempt = 0.0  # when to serve (UNSERVED) or register (REGISTERING) next
        self._stream_deadline: float | None = None  # AWAITING_STREAM: register again then
        # The kubelet's stream: the first one opened since the latest Register attempt. Only its
        # end means the kubelet let go; other streams (an older kubelet's, a tool's) do not.
        self._kubelet_stream: tuple[DevicePluginServicer, int] | None = None
        self._kubelet_stream_opened = 0.0
        # The kubelet's stream from before STANDBY, while it stays open: a kubelet that tracks
        # instances per socket (1.37+) still serves the resource through it.
        self._standby_stream: tuple[DevicePluginServicer, int] | None = None
        self._attempted_kubelet: tuple[int, int, int] | None = None  # kubelet.sock of the last attempt
        self._waiting_logged = False
        self._siblings = Siblings(
            endpoint,
            instance,
            lambda i, registered: self.post(SuccessorState(i, registered)),
            lambda i: self.post(SuccessorGone(i)),
        )
        self._status = RunnerStatus(Phase.UNSERVED)

    # Thread-safe entry points -------------------------------------------------------------

    def post(self, event: Event) -> None:
        self._events.put(event)

    def stop(self) -> None:
        self.post(Stop())

    def status(self) -> RunnerStatus:
        return self._status

    def stream_opened(self, servicer: DevicePluginServicer, stream: int) -> None:
        self.post(StreamOpened(servicer, stream))

    def stream_closed(self, servicer: DevicePluginServicer, stream: int) -> None:
        self.post(StreamClosed(servicer, stream))

    def info_requested(self) -> None:
        self.post(InfoRequested())

    def registration_status(self, registered: bool, error: str) -> None:
        self.post(RegistrationStatus(registered, error))

    # The loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Runs until a Stop event."""
        self.start()
        try:
            while self.phase is not Phase.STOPPED:
                try:
                    event: Event | None = self._events.get(timeout=self._timeout())
                except queue.Empty:
                    event = None
                self.handle(event)
        finally:
            self._shut_down()

    def start(self) -> None:
        self._siblings.remove_dead()
        self._converge()
        self._siblings.follow_newest()
        self._publish_status()

    def handle_queued(self) -> None:
        """Handles every event already queued (for tests that drive the machine by hand)."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self.handle(event)

    def handle(self, event: Event | None) -> None:
        """One step of the machine; None means only that time passed."""
        match event:
            case Stop():
                self._shut_down()
                return
            case DirectoryChanged(name, mask):
                self._directory_changed(name, mask)
            case StreamOpened(servicer, stream) if self._is_current(servicer):
                self._stream_opened(servicer, stream)
            case StreamClosed(servicer, stream) if (servicer, stream) == self._kubelet_stream:
                self._kubelet_stream_closed()
            case StreamClosed(servicer, stream) if (servicer, stream) == self._standby_stream:
                self._standby_stream = None
            case StreamOpened() | StreamClosed():
                pass  # a stream of a replaced server, or not the kubelet's: nothing to do
            case RegisterDone(future) if future is self._pending:
                self._pending = None
                self._registration_finished(future)
            case RegisterDone():
                pass  # an attempt abandoned for a newer one
            case PolicyChanged(policy, taken):
                self._policy_changed(policy)
                if taken is not None:
                    taken.set()
            case SuccessorState(instance, registered) if self._siblings.follows(instance):
                self._successor_state(registered)
            case SuccessorGone(instance) if self._siblings.follows(instance):
                self._successor_gone()
            case SuccessorState() | SuccessorGone():
                pass  # from a successor we no longer follow
            case InfoRequested():
                self._info_requested()
            case RegistrationStatus(registered, error):
                self._registration_status(registered, error)
        self._converge()
        self._publish_status()

    def _timeout(self) -> float | None:
        """Seconds until the machine has something to do by itself, or None to wait for events."""
        due: float | None = None
        if self.phase is Phase.UNSERVED or (self.phase is Phase.REGISTERING and self._pending is None):
            due = self._next_attempt
        elif self.phase is Phase.AWAITING_STREAM:
            due = self._stream_deadline
        return None if due is None else max(0.0, due - self._now())

    def _converge(self) -> None:
        """Acts on the real state: our socket, and the deadlines of the current phase."""
        if self.phase is Phase.STOPPED:
            return
        if self._watcher_mode:
            self._converge_watcher(self._now())  # may drop the socket, to serve a new one below
        if self.server is None or not self.server.owns_socket():
            self._serve()
        if self._watcher_mode:
            return
        now = self._now()
        if self.phase is Phase.AWAITING_STREAM and self._stream_deadline is not None and now >= self._stream_deadline:
            logging.warning(
                "%s: the kubelet did not call ListAndWatch within %.0f s of registering; registering again",
                self._resource,
                self._list_and_watch_timeout_s,
            )
            self._register_again(back_off=False)
        if self.phase is Phase.REGISTERING and self._pending is None and now >= self._next_attempt:
            self._attempt_register()

    def _set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            logging.vlog(1, "%s: %s -> %s", self._resource, self.phase.name, phase.name)
            self.phase = phase
            if self.server is not None:
                self.server.handoff.set_registered(phase is Phase.REGISTERED)

    def _publish_status(self) -> None:
        self._status = RunnerStatus(
            phase=self.phase,
            socket=self.socket,
            problem=self._problem,
            successor=self._siblings.successor.instance if self._siblings.successor is not None else None,
        )

    # Serving --------------------------------------------------------------------------------

    def _serve(self) -> None:
        """Starts a server on our socket (again), first the new one, then stopping the old, so a
        sibling following our Handoff stream reconnects at once instead of seeing us gone."""
        old = self.server
        if old is None and self._now() < self._next_attempt:
            return
        if not self._watching_directory():
            return
        servicer = DevicePluginServicer(self.policy, self)
        registration = None
        if self._watcher_mode:
            # Imported only in this mode: the pluginregistration API is start-up time and memory
            # that a kubelet.sock plugin never uses (BENCHMARKS.md, "Memory and start-up").
            from token_resource.plugin_watcher import RegistrationService

            registration = RegistrationService(self._resource, self)
        try:
            new = PluginServer(self._socket_path, servicer, HandoffService(self.instance, self._resource), registration)
        except CannotServeError as error:
            if old is not None:
                self._stop_server()
            self._cannot_serve(str(error))
            return
        if old is not None:
            logging.info("%s: plugin socket removed (kubelet restart); serving again", self._resource)
            metrics.KUBELET_RESTARTS.labels(self._resource).inc()
            old.stop()
        else:
            logging.info("%s: serving on %s", self._resource, self._socket_path)
        self.server = new
        if not self._watcher_mode:  # there, a refusal stays shown until the kubelet accepts
            self._problem = None
        self._kubelet_stream = None
        metrics.TOKENS.labels(self._resource).set(len(self.policy.devices().devices))
        if self.phase is Phase.STANDBY:
            return  # the newer instance registers; we only keep a socket to take over from
        self._set_phase(Phase.REGISTERING)
        self._cancel_pending()
        new.handoff.set_registered(False)
        if self._watcher_mode:
            self._await_watcher()  # the back-off resets only when the kubelet accepts
        else:
            self._restart_backoff()

    def _cannot_serve(self, problem: str) -> None:
        if problem != self._problem:
            logging.error("%s: cannot serve: %s", self._resource, problem)
        self._problem = problem
        self._cancel_pending()
        self._set_phase(Phase.UNSERVED)
        self._back_off(first_at_once=False)

    def _watching_directory(self) -> bool:
        if self._watcher is None or self._subscription is not None:
            return True
        try:
            self._subscription = self._watcher.subscribe(
                self.endpoint.socket_dir,
                kubelet.DIRECTORY_MASK,
                lambda name, mask: self.post(DirectoryChanged(name, mask)),
            )
        except OSError as error:
            self._cannot_serve(f"cannot watch {self.endpoint.socket_dir}: {error.strerror}")
            return False
        return True

    def _unwatch_directory(self) -> None:
        if self._subscription is not None and self._watcher is not None:
            self._watcher.unsubscribe(self._subscription)
        self._subscription = None

    def _stop_server(self) -> None:
        server, self.server = self.server, None
        self._kubelet_stream = self._standby_stream = None
        if server is not None:
            server.stop()

    def _shut_down(self) -> None:
        if self.phase is Phase.STOPPED:
            return
        self._cancel_pending()
        self._siblings.unfollow()
        self._stop_server()
        self._unwatch_directory()
        self._set_phase(Phase.STOPPED)
        self._publish_status()
        logging.info("%s: stopped", self._resource)

    def _is_current(self, servicer: DevicePluginServicer) -> bool:
        return self.server is not None and servicer is self.server.servicer

    # The kubelet's directory ------------------------------------------------------------------

    def _directory_changed(self, name: str, mask: int) -> None:
        match kubelet.classify(name, mask):
            case DirectoryEvent.DIRECTORY_REMOVED:
                self._unwatch_directory()  # a renamed directory would go on reporting its events
                self._stop_server()
                self._cannot_serve(f"the directory {self.endpoint.socket_dir} was removed")
            case DirectoryEvent.KUBELET_SOCKET_CREATED if not self._watcher_mode:
                self._kubelet_socket_created()
            case DirectoryEvent.SOCKET_CREATED if (self.endpoint.instance_of(name) or 0) > self.instance:
                self._siblings.follow_newest()
            case DirectoryEvent.SOCKET_REMOVED if name == self.socket and self.phase is Phase.UNSERVED:
                self._next_attempt = self._now()  # the process that held our socket let go of it
            case _:
                pass  # our own socket's removal shows in _converge, which compares its inode

    def _kubelet_socket_created(self) -> None:
        if self.phase is Phase.UNSERVED:
            self._next_attempt = self._now()  # a kubelet start is a good moment to try again
        # Level-triggered: an attempt already made to this very kubelet.sock stands, so a restart
        # seen both as a closed stream and as a new socket registers only once.
        elif (
            self.phase in (Phase.REGISTERING, Phase.AWAITING_STREAM, Phase.REGISTERED)
            and _identity(self.endpoint.kubelet_socket_path) != self._attempted_kubelet
        ):
            logging.info("%s: kubelet.sock created (kubelet restart); registering again", self._resource)
            self._register_again(back_off=False)

    # Registration ---------------------------------------------------------------------------

    def _stream_opened(self, servicer: DevicePluginServicer, stream: int) -> None:
        if self._kubelet_stream is not None or self.phase not in (Phase.REGISTERING, Phase.AWAITING_STREAM):
            return  # not the first stream since our Register: not the kubelet's answer to it
        if self.phase is Phase.REGISTERING and self._pending is None and not self._watcher_mode:
            return  # no Register since the last one ended: a tool's stream
        self._kubelet_stream = (servicer, stream)
        self._kubelet_stream_opened = self._now()
        logging.info("%s: kubelet opened ListAndWatch", self._resource)
        if self.phase is Phase.AWAITING_STREAM:  # E2 kubelets open it before Register returns
            self._registered()

    def _kubelet_stream_closed(self) -> None:
        self._kubelet_stream = None
        lived = self._now() - self._kubelet_stream_opened
        if self._siblings.successor_registered:
            logging.info("%s: the kubelet's ListAndWatch stream ended; a newer instance is registered", self._resource)
            self._standby()
            return
        if self._watcher_mode:
            # A kubelet restart: the new kubelet finds the socket again by itself.
            logging.info("%s: the kubelet's ListAndWatch stream ended; waiting to be found again", self._resource)
            self._set_phase(Phase.REGISTERING)
            self._await_watcher()
            return
        logging.info(
            "%s: the kubelet's ListAndWatch stream ended after %.1f s; registering again", self._resource, lived
        )
        self._register_again(back_off=lived < STABLE_STREAM_S)

    def _register_again(self, back_off: bool) -> None:
        """Registers again: at once, or after the next back-off step when the previous
        registration did not hold."""
        self._cancel_pending()
        self._stream_deadline = None
        self._set_phase(Phase.REGISTERING)
        if back_off:
            self._back_off()
        else:
            self._restart_backoff()

    def _attempt_register(self) -> None:
        if not os.path.exists(self.endpoint.kubelet_socket_path):
            if not self._waiting_logged:
                logging.info("%s: waiting for %s", self._resource, self.endpoint.kubelet_socket_path)
                self._waiting_logged = True
            self._back_off()  # the CREATE event normally comes first; this covers a missed one
            return
        self._waiting_logged = False
        self._attempted_kubelet = _identity(self.endpoint.kubelet_socket_path)
        self._kubelet_stream = None
        future = self._register(self.endpoint.kubelet_socket_path, self.socket, self._resource, self.policy.options())
        self._pending = future
        future.add_done_callback(lambda done: self.post(RegisterDone(done)))

    def _registration_finished(self, future: Any) -> None:
        if future.cancelled():
            return
        try:
            future.result()
        except grpc.RpcError as error:
            if self._standby_stream is not None:
                # Taking over, refused, while the kubelet still holds our earlier stream: a kubelet
                # that tracks instances per socket (1.37+) never stopped serving through it.
                logging.info("%s: the kubelet still holds this instance's stream; registered", self._resource)
                self._kubelet_stream, self._standby_stream = self._standby_stream, None
                self._registered()
                return
            metrics.REGISTRATION_FAILURES.labels(self._resource).inc()
            delay = self._back_off()
            logging.warning(
                "%s: Register failed (%s); retrying in %.1f s", self._resource, kubelet.describe_rpc_error(error), delay
            )
            return
        metrics.REGISTRATIONS.labels(self._resource).inc()
        logging.info(
            "%s: registered with the kubelet as %s (%d devices)",
            self._resource,
            self.socket,
            len(self.policy.devices().devices),
        )
        if self._kubelet_stream is not None:
            self._registered()
        else:
            self._set_phase(Phase.AWAITING_STREAM)
            self._stream_deadline = self._now() + self._list_and_watch_timeout_s

    def _registered(self) -> None:
        # The back-off resets only once the stream has held (see _kubelet_stream_closed).
        self._stream_deadline = None
        self._set_phase(Phase.REGISTERED)

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _restart_backoff(self) -> None:
        self._backoff.reset()
        self._next_attempt = 0.0

    def _back_off(self, first_at_once: bool = True) -> float:
        """Schedules the next attempt after a failure. A registration's first retry is immediate:
        a kubelet 1.25-1.36 drops a new instance's stream once when the instance it replaced
        disconnects (kubernetes#121994), and that must cost nothing. Serving has no such case."""
        delay = self._backoff.next_delay(first_at_once)
        self._next_attempt = self._now() + delay
        return delay

    # Registration through the plugin watcher ----------------------------------------------------

    def _await_watcher(self) -> None:
        self._next_attempt = self._now() + WATCHER_TIMEOUT_S

    def _converge_watcher(self, now: float) -> None:
        if self.phase is Phase.AWAITING_STREAM and self._stream_deadline is not None and now >= self._stream_deadline:
            self._recreate_socket("the kubelet accepted the registration but did not call ListAndWatch")
        elif self.phase is Phase.REGISTERING and now >= self._next_attempt:
            self._recreate_socket(f"the kubelet did not ask for GetInfo within {WATCHER_TIMEOUT_S:.0f} s")

    def _info_requested(self) -> None:
        if self.phase in (Phase.REGISTERING, Phase.AWAITING_STREAM, Phase.REGISTERED):
            logging.info("%s: the kubelet's plugin watcher found %s", self._resource, self._socket_path)
            # A new registration (a restarted kubelet's, say): its stream is the one to follow,
            # even if the old stream's end has not been seen yet.
            self._kubelet_stream = None
            self._stream_deadline = None
            self._set_phase(Phase.REGISTERING)
            self._await_watcher()  # it dials and calls GetDevicePluginOptions next; allow it time

    def _registration_status(self, registered: bool, error: str) -> None:
        if self.phase not in (Phase.REGISTERING, Phase.AWAITING_STREAM):
            return
        if not registered:
            metrics.REGISTRATION_FAILURES.labels(self._resource).inc()
            self._recreate_socket(f"the kubelet refused the registration: {error}")
            return
        metrics.REGISTRATIONS.labels(self._resource).inc()
        self._restart_backoff()
        self._problem = None
        logging.info("%s: registered with the kubelet through the plugin watcher", self._resource)
        if self._kubelet_stream is not None:
            self._registered()
        else:
            self._set_phase(Phase.AWAITING_STREAM)
            self._stream_deadline = self._now() + self._list_and_watch_timeout_s

    def _recreate_socket(self, why: str) -> None:
        """The kubelet will not come back to this socket by itself: remove it (the kubelet
        deregisters it) and serve a new one, with back-off, for its watcher to find."""
        delay = self._back_off()
        logging.warning("%s: %s; re-creating %s in %.1f s", self._resource, why, self._socket_path, delay)
        self._problem = why
        self._stream_deadline = None
        self._stop_server()
        self._set_phase(Phase.UNSERVED)

    # The policy -------------------------------------------------------------------------------

    def _policy_changed(self, policy: DevicePolicy) -> None:
        self.policy = policy
        metrics.TOKENS.labels(self._resource).set(len(policy.devices().devices))
        # A standby instance stops publishing: on kubelets 1.20-1.24 its open stream still
        # feeds the resource's device list, which is the newer instance's to say.
        if self.server is not None and self.phase is not Phase.STANDBY:
            self.server.servicer.set_policy(policy)

    # Hand-off -----------------------------------------------------------------------------------

    def _successor_state(self, registered: bool) -> None:
        self._siblings.successor_registered = registered
        if registered and self.phase is not Phase.STANDBY and self.phase is not Phase.UNSERVED:
            self._standby()

    def _standby(self) -> None:
        successor = self._siblings.successor
        logging.info(
            "%s: standby: instance %s holds the registration; this one will not register again unless it goes",
            self._resource,
            successor.instance if successor is not None else "?",
        )
        self._cancel_pending()
        self._stream_deadline = None
        # Whatever becomes of our stream now, we do not register again because it ends.
        self._standby_stream, self._kubelet_stream = self._kubelet_stream, None
        self._set_phase(Phase.STANDBY)

    def _successor_gone(self) -> None:
        gone = self._siblings.successor.instance if self._siblings.successor is not None else None
        self._siblings.unfollow()
        self._siblings.follow_newest()  # it may only have replaced its server (kubelet restart)
        if self._siblings.successor is None and self.phase is Phase.STANDBY:
            logging.info("%s: instance %d is gone; taking over the registration", self._resource, gone)
            if self.server is not None:
                self.server.servicer.set_policy(self.policy)
            self._register_again(back_off=False)


def _identity(path: str) -> tuple[int, int, int] | None:
    """Which file `path` is: inode numbers are reused at once, so the change time counts too."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


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
