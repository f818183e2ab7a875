"""The runner's state machine, driven in-process event by event with a fake clock.

The gRPC server and its socket are real (a short directory under /tmp); the kubelet's side of
Register is scripted: each call returns a future the test completes. Stream events are posted
as the servicer would post them. Nothing here sleeps: time moves only when the test says so.
"""

import concurrent.futures
import itertools
import os
import random
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

import grpc
import pytest

from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from pluginregistration.v1 import api_pb2 as registration_pb2
from pluginregistration.v1 import api_pb2_grpc as registration_pb2_grpc
from tests.daemon import short_tempdir
from token_resource import lifecycle
from token_resource.backoff import BACKOFF_CAP_S
from token_resource.kubelet import Endpoint, Registration
from token_resource.lifecycle import DirectoryChanged, Phase, PluginRunner, StreamClosed, StreamOpened
from token_resource.plugin_server import PluginServer
from token_resource.policy import AllocationError
from token_resource.watch import flags

RESOURCE = "example.com/widget"
TIMEOUT_S = 20.0


class StaticPolicy:
    """A policy with nothing to do with tokens: the runner must not care."""

    def __init__(self, ids: Sequence[str]) -> None:
        self._devices = api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=i, health="Healthy") for i in ids])

    @property
    def resource(self) -> str:
        return RESOURCE

    def options(self) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(pre_start_required=True)

    def devices(self) -> api_pb2.ListAndWatchResponse:
        return self._devices

    def allocate(self, ids: Sequence[str]) -> api_pb2.ContainerAllocateResponse:
        raise AllocationError("not used here")

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Refused(grpc.RpcError):
    def __str__(self) -> str:
        return "the kubelet said no"


class ScriptedKubelet:
    """The kubelet's side of Register: the test answers each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, api_pb2.DevicePluginOptions]] = []
        self.futures: list[concurrent.futures.Future[api_pb2.Empty]] = []

    def __call__(
        self, kubelet_socket: str, endpoint: str, resource: str, options: api_pb2.DevicePluginOptions
    ) -> concurrent.futures.Future[api_pb2.Empty]:
        self.calls.append((kubelet_socket, endpoint, resource, options))
        future: concurrent.futures.Future[api_pb2.Empty] = concurrent.futures.Future()
        self.futures.append(future)
        return future

    def answer(self, runner: PluginRunner, error: grpc.RpcError | None = None) -> None:
        future = self.futures[-1]
        if error is None:
            future.set_result(api_pb2.Empty())
        else:
            future.set_exception(error)
        runner.handle_queued()


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    directory = short_tempdir()
    with open(os.path.join(directory, "kubelet.sock"), "w"):
        pass  # Register is scripted: the file only has to exist
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class MakeRunner(Protocol):
    """The make_runner fixture: a PluginRunner on plugin_dir, registering with a ScriptedKubelet."""

    def __call__(
        self,
        instance: int = 1,
        per_instance: bool = True,
        kubelet: ScriptedKubelet | None = None,
        clock: Callable[[], float] | None = None,
    ) -> PluginRunner: ...


@pytest.fixture
def make_runner(plugin_dir: str) -> Iterator[MakeRunner]:
    runners: list[PluginRunner] = []

    def make(
        instance: int = 1,
        per_instance: bool = True,
        kubelet: ScriptedKubelet | None = None,
        clock: Callable[[], float] | None = None,
    ) -> PluginRunner:
        runner = PluginRunner(
            Endpoint(RESOURCE, "widget.sock", plugin_dir, per_instance=per_instance),
            StaticPolicy(["a", "b"]),
            instance=instance,
            list_and_watch_timeout_s=TIMEOUT_S,
            clock=clock if clock is not None else Clock(),
            register=kubelet if kubelet is not None else ScriptedKubelet(),
            rng=random.Random(7),
        )
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.handle(lifecycle.Stop())


def serving(runner: PluginRunner) -> PluginServer:
    """runner.server, where the test knows the runner serves."""
    assert runner.server is not None, "not serving"
    return runner.server


def due_in(runner: PluginRunner) -> float:
    """The seconds until the runner's next timeout, where the test knows one is due."""
    timeout = runner._timeout()
    assert timeout is not None, "no timeout due"
    return timeout


def problem(runner: PluginRunner) -> str:
    """Why the runner cannot serve, where the test knows it cannot."""
    problem = runner.status().problem
    assert problem is not None, "no problem"
    return problem


def registered(runner: PluginRunner, kubelet: ScriptedKubelet) -> None:
    """Completes the pending Register and opens the kubelet's stream (the 1.20-1.24 order)."""
    kubelet.answer(runner)
    assert runner.phase is Phase.AWAITING_STREAM
    runner.handle(StreamOpened(serving(runner).servicer, 100 + len(kubelet.calls)))
    assert runner.phase is Phase.REGISTERED


def test_start_serves_first_then_registers_its_own_socket_name(make_runner: MakeRunner, plugin_dir: str) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(instance=42, kubelet=kubelet)
    runner.start()
    assert runner.phase is Phase.REGISTERING
    assert sorted(os.listdir(plugin_dir)) == [
        "kubelet.sock",
        "widget.42.sock",
    ]
    [(kubelet_socket, endpoint, resource, options)] = kubelet.calls
    assert (kubelet_socket, endpoint, resource) == (
        os.path.join(plugin_dir, "kubelet.sock"),
        "widget.42.sock",
        RESOURCE,
    )
    assert options.pre_start_required
    assert not runner.status().ready


def test_register_then_list_and_watch_is_registered(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(kubelet=kubelet)
    runner.start()
    registered(runner, kubelet)
    assert runner.status().ready and runner.status().registered
    assert runner._timeout() is None  # nothing to do until something happens


def test_a_stream_opened_before_register_returns_counts(make_runner: MakeRunner) -> None:
    """Kubelets 1.25+ open ListAndWatch before they answer Register."""
    kubelet = ScriptedKubelet()
    runner = make_runner(kubelet=kubelet)
    runner.start()
    runner.handle(StreamOpened(serving(runner).servicer, 1))
    assert runner.phase is Phase.REGISTERING
    kubelet.answer(runner)
    assert runner.phase is Phase.REGISTERED


def test_no_list_and_watch_in_time_registers_again(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = make_runner(kubelet=kubelet, clock=clock)
    runner.start()
    kubelet.answer(runner)
    assert runner._timeout() == TIMEOUT_S
    clock.now += TIMEOUT_S - 0.1
    runner.handle(None)
    assert len(kubelet.calls) == 1
    clock.now += 0.1
    runner.handle(None)
    assert len(kubelet.calls) == 2 and runner.phase is Phase.REGISTERING


def test_a_stream_that_held_ends_and_registration_is_at_once(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = make_runner(kubelet=kubelet, clock=clock)
    runner.start()
    registered(runner, kubelet)
    clock.now += 3600
    runner.handle(StreamClosed(serving(runner).servicer, 101))
    assert len(kubelet.calls) == 2


def test_short_streams_back_off_after_one_immediate_retry(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = make_runner(kubelet=kubelet, clock=clock)
    runner.start()
    delays = []
    for _ in range(8):
        registered(runner, kubelet)
        clock.now += 1  # the stream dies young
        calls = len(kubelet.calls)
        runner.handle(StreamClosed(serving(runner).servicer, 100 + calls))
        if len(kubelet.calls) == calls:  # backing off: how long until the next attempt?
            delays.append(due_in(runner))
            clock.now += due_in(runner)
            runner.handle(None)
        else:
            delays.append(0.0)
        assert len(kubelet.calls) == calls + 1
    assert delays[0] == 0.0
    assert 0.25 <= delays[1] <= 0.5
    assert all(later >= earlier / 2 for earlier, later in itertools.pairwise(delays[1:]))
    assert 5.0 <= delays[-1] <= BACKOFF_CAP_S


def test_register_failures_back_off(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = make_runner(kubelet=kubelet, clock=clock)
    runner.start()
    kubelet.answer(runner, Refused())
    assert len(kubelet.calls) == 2  # the first retry is immediate
    kubelet.answer(runner, Refused())
    assert len(kubelet.calls) == 2
    assert 0.25 <= due_in(runner) <= 0.5
    clock.now += due_in(runner)
    runner.handle(None)
    assert len(kubelet.calls) == 3


def test_kubelet_socket_recreated_registers_once(make_runner: MakeRunner, plugin_dir: str) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(kubelet=kubelet)
    runner.start()
    registered(runner, kubelet)
    path = os.path.join(plugin_dir, "kubelet.sock")
    os.unlink(path)
    with open(path, "w"):
        pass
    created = DirectoryChanged("kubelet.sock", flags.CREATE)
    runner.handle(created)
    assert len(kubelet.calls) == 2
    runner.handle(StreamClosed(serving(runner).servicer, 101))  # the old kubelet's stream ends too
    runner.handle(created)  # and the same creation is seen again
    assert len(kubelet.calls) == 2


def test_socket_removed_serves_again_and_ignores_the_old_servers_streams(
    make_runner: MakeRunner, plugin_dir: str
) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(instance=5, kubelet=kubelet)
    runner.start()
    registered(runner, kubelet)
    old = serving(runner)
    os.unlink(os.path.join(plugin_dir, "widget.5.sock"))
    runner.handle(DirectoryChanged("widget.5.sock", flags.DELETE))
    assert runner.server is not old and serving(runner).owns_socket()
    assert len(kubelet.calls) == 2 and runner.phase is Phase.REGISTERING
    runner.handle(StreamClosed(old.servicer, 101))  # stale: the old server's
    assert len(kubelet.calls) == 2


def test_a_tools_stream_does_not_count(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(kubelet=kubelet)
    runner.start()
    registered(runner, kubelet)
    runner.handle(StreamOpened(serving(runner).servicer, 7))
    runner.handle(StreamClosed(serving(runner).servicer, 7))
    assert runner.phase is Phase.REGISTERED and len(kubelet.calls) == 1


def test_a_busy_fixed_socket_is_retried_and_taken_when_freed(make_runner: MakeRunner, plugin_dir: str) -> None:
    path = os.path.join(plugin_dir, "widget.sock")
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(path)
    holder.listen()
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = make_runner(per_instance=False, kubelet=kubelet, clock=clock)
    runner.start()
    assert runner.phase is Phase.UNSERVED
    assert "another process is serving on" in problem(runner)
    assert 0.25 <= due_in(runner) <= 0.5
    clock.now += due_in(runner)
    runner.handle(None)
    assert runner.phase is Phase.UNSERVED and kubelet.calls == []
    assert 0.5 <= due_in(runner) <= 1.0
    holder.close()
    os.unlink(path)
    runner.handle(DirectoryChanged("widget.sock", flags.DELETE))  # retried at once, not after the back-off
    assert runner.phase is Phase.REGISTERING and len(kubelet.calls) == 1
    assert runner.status().problem is None


def test_the_directory_removed_and_recreated_is_served_again(make_runner: MakeRunner, plugin_dir: str) -> None:
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = make_runner(instance=3, kubelet=kubelet, clock=clock)
    runner.start()
    registered(runner, kubelet)
    shutil.rmtree(plugin_dir)
    runner.handle(DirectoryChanged("", flags.DELETE_SELF))
    assert runner.phase is Phase.UNSERVED and "was removed" in problem(runner)
    clock.now += due_in(runner)
    runner.handle(None)
    assert runner.phase is Phase.UNSERVED and "does not exist" in problem(runner)
    os.mkdir(plugin_dir)
    with open(os.path.join(plugin_dir, "kubelet.sock"), "w"):
        pass
    runner.handle(DirectoryChanged("kubelet.sock", flags.CREATE))  # the kubelet is back: try at once
    assert runner.phase is Phase.REGISTERING and os.path.exists(os.path.join(plugin_dir, "widget.3.sock"))
    assert len(kubelet.calls) == 2


def test_a_new_policy_reaches_the_open_stream(make_runner: MakeRunner) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(kubelet=kubelet)
    runner.start()
    with grpc.insecure_channel(f"unix://{serving(runner).path}") as channel:
        stream = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty(), timeout=10)
        assert [d.ID for d in next(stream).devices] == ["a", "b"]
        taken = threading.Event()
        runner.post(lifecycle.PolicyChanged(StaticPolicy(["a"]), taken))
        assert not taken.is_set()  # posted, not handled yet
        runner.handle_queued()
        assert taken.is_set()  # what a reload that withheld a lower count waits for before sealing
        assert [d.ID for d in next(stream).devices] == ["a"]
        stream.cancel()


def test_stop_removes_the_socket_and_cancels_a_pending_register(make_runner: MakeRunner, plugin_dir: str) -> None:
    kubelet = ScriptedKubelet()
    runner = make_runner(instance=9, kubelet=kubelet)
    runner.start()
    runner.handle(lifecycle.Stop())
    assert runner.phase is Phase.STOPPED
    assert kubelet.futures[0].cancelled()
    assert sorted(os.listdir(plugin_dir)) == ["kubelet.sock"]


# Hand-off between two instances: both real runners with real sockets in one directory. -------


def next_event(runner: PluginRunner) -> None:
    """Handles the next event, waiting for it (they come from the hand-off watch's thread)."""
    runner.handle(runner._events.get(timeout=10))


class Pair(NamedTuple):
    """Two instances of one resource: `old` registered, `new` serving beside it."""

    old: PluginRunner
    old_kubelet: ScriptedKubelet
    new: PluginRunner
    new_kubelet: ScriptedKubelet


def surge(make_runner: MakeRunner) -> Pair:
    old_kubelet, new_kubelet = ScriptedKubelet(), ScriptedKubelet()
    old = make_runner(instance=1, kubelet=old_kubelet)
    old.start()
    registered(old, old_kubelet)
    new = make_runner(instance=2, kubelet=new_kubelet)
    new.start()
    return Pair(old, old_kubelet, new, new_kubelet)


def test_an_older_instance_steps_aside_and_takes_over_when_the_newer_goes(
    make_runner: MakeRunner, plugin_dir: str
) -> None:
    old, old_kubelet, new, new_kubelet = surge(make_runner)
    old.handle(DirectoryChanged("widget.2.sock", flags.CREATE))
    assert old.status().successor == 2
    next_event(old)  # the newer one's first state: not registered yet
    assert old.phase is Phase.REGISTERED
    registered(new, new_kubelet)
    next_event(old)
    assert old.phase is Phase.STANDBY and old.status().ready
    # The kubelet drops the old instance's stream (1.25-1.36 do): it does not register again.
    old.handle(StreamClosed(serving(old).servicer, 101))
    assert len(old_kubelet.calls) == 1
    new.handle(lifecycle.Stop())
    next_event(old)
    assert old.phase is Phase.REGISTERING and len(old_kubelet.calls) == 2  # at once


def test_a_newer_instance_never_defers_to_an_older_one(make_runner: MakeRunner) -> None:
    new = surge(make_runner).new
    new.handle(DirectoryChanged("widget.1.sock", flags.CREATE))
    assert new.status().successor is None and new.phase is Phase.REGISTERING


def test_the_newest_instance_removes_dead_siblings_sockets(make_runner: MakeRunner, plugin_dir: str) -> None:
    dead = os.path.join(plugin_dir, "widget.1.sock")
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(dead)  # bound, never served: what a killed process leaves
    runner = make_runner(instance=2)
    runner.start()
    assert not os.path.exists(dead)


# Registration through the plugin watcher: the kubelet finds the socket; nothing calls Register. --


# A runner in plugin-watcher mode, the clock it reads and the kubelet it would register with.
Watched = tuple[PluginRunner, Clock, ScriptedKubelet]


@pytest.fixture
def registry_dir() -> Iterator[str]:
    directory = short_tempdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def watched(plugin_dir: str, registry_dir: str) -> Iterator[Watched]:
    """A runner in plugin-watcher mode, serving, with a clock the test moves."""
    kubelet = ScriptedKubelet()
    clock = Clock()
    runner = PluginRunner(
        Endpoint(
            RESOURCE, "widget.sock", plugin_dir, registration=Registration.PLUGIN_WATCHER, registry_dir=registry_dir
        ),
        StaticPolicy(["a"]),
        instance=1,
        clock=clock,
        register=kubelet,
        rng=random.Random(7),
    )
    runner.start()
    yield runner, clock, kubelet
    runner.handle(lifecycle.Stop())


def get_info(runner: PluginRunner) -> registration_pb2.PluginInfo:
    """The plugin watcher's GetInfo, over the real socket."""
    with grpc.insecure_channel(f"unix://{serving(runner).path}") as channel:
        info = registration_pb2_grpc.RegistrationStub(channel).GetInfo(registration_pb2.InfoRequest(), timeout=1)
    runner.handle_queued()
    return info


def test_watcher_mode_serves_in_the_registry_and_never_calls_register(watched: Watched, registry_dir: str) -> None:
    runner, _, kubelet = watched
    assert os.listdir(registry_dir) == ["widget.sock"]  # a fixed name: the kubelet keys it by path
    info = get_info(runner)
    assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
        "DevicePlugin",
        RESOURCE,
        "",  # this very socket serves the DevicePlugin service too
        ["v1beta1"],
    )
    runner.handle(StreamOpened(serving(runner).servicer, 1))  # the kubelet opens it before it notifies
    runner.handle(lifecycle.RegistrationStatus(True, ""))
    assert runner.phase is Phase.REGISTERED and kubelet.calls == []


def test_watcher_mode_waits_for_a_restarted_kubelet_to_find_it_again(watched: Watched) -> None:
    runner, _, kubelet = watched
    get_info(runner)
    runner.handle(lifecycle.RegistrationStatus(True, ""))
    runner.handle(StreamOpened(serving(runner).servicer, 1))
    served = runner.server
    runner.handle(StreamClosed(serving(runner).servicer, 1))
    assert runner.phase is Phase.REGISTERING and runner.server is served  # no new socket, no Register
    assert runner._timeout() == lifecycle.WATCHER_TIMEOUT_S
    get_info(runner)
    runner.handle(StreamOpened(serving(runner).servicer, 2))
    runner.handle(lifecycle.RegistrationStatus(True, ""))
    assert runner.phase is Phase.REGISTERED and runner.server is served and kubelet.calls == []


def test_watcher_mode_recreates_the_socket_when_the_kubelet_refuses(watched: Watched) -> None:
    runner, clock, _ = watched
    get_info(runner)
    served = runner.server
    runner.handle(lifecycle.RegistrationStatus(False, "RegisterPlugin error -- failed to dial"))
    assert runner.phase is Phase.REGISTERING and runner.server is not served  # at once, the first time
    assert "failed to dial" in problem(runner)
    runner.handle(lifecycle.RegistrationStatus(False, "RegisterPlugin error -- failed to dial"))
    assert runner.phase is Phase.UNSERVED  # then with back-off
    assert 0.25 <= due_in(runner) <= 0.5
    clock.now += due_in(runner)
    runner.handle(None)
    assert runner.phase is Phase.REGISTERING and serving(runner).owns_socket()


def test_watcher_mode_recreates_the_socket_when_nobody_asks(watched: Watched) -> None:
    runner, clock, _ = watched
    served = runner.server
    clock.now += lifecycle.WATCHER_TIMEOUT_S
    runner.handle(None)
    assert runner.server is not served and runner.phase is Phase.REGISTERING
    assert "did not ask for GetInfo" in problem(runner)


def test_taking_over_while_the_kubelet_still_holds_our_stream(make_runner: MakeRunner) -> None:
    """A kubelet that tracks instances per socket (1.37+) kept serving through the older
    instance's stream and refuses a second registration of that socket: that is registered."""
    old, old_kubelet, new, new_kubelet = surge(make_runner)
    old.handle(DirectoryChanged("widget.2.sock", flags.CREATE))
    next_event(old)
    registered(new, new_kubelet)
    next_event(old)
    assert old.phase is Phase.STANDBY
    new.handle(lifecycle.Stop())
    next_event(old)
    old_kubelet.answer(old, Refused())
    assert old.phase is Phase.REGISTERED and len(old_kubelet.calls) == 2
    old.handle(StreamClosed(serving(old).servicer, 101))  # and when that stream ends, it registers again
    assert old.phase is Phase.REGISTERING and len(old_kubelet.calls) == 3
