"""A kubelet that restarts over and over, sometimes while Allocate calls are in flight.

Each restart deletes every socket in the directory and re-creates kubelet.sock, as the real
kubelet does. The daemon must register exactly once per restart, end up connected with all its
tokens, and hold no more threads or descriptors than when it started.
"""

import threading

import grpc

from tests import procfs
from tests.conftest import StartDaemon, StartKubelet
from tests.fake_kubelet import FakeKubelet, Mode, advertising
from tests.reliability.common import RESOURCE, allocate_request, channel, plugin_args, scaled, stub
from token_resource import tokens

COUNT = 4
CYCLES = scaled(200, 1000)
# While the plugin's socket is being replaced, calls on a client channel fail with one of these
# (the connection dropped, or no listener yet); nothing else is acceptable.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class _AllocateLoad:
    """Allocate calls in a loop on its own channel, as a kubelet admitting pods would make them."""

    def __init__(self, plugin_dir: str) -> None:
        self._channel = channel(plugin_dir)
        self._stub = stub(self._channel)
        self._stop = threading.Event()
        self.ok = 0
        self.transient: dict[str, int] = {}
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = allocate_request(["item-1", "item-3"])
        while not self._stop.is_set():
            try:
                response = self._stub.Allocate(request, timeout=10, wait_for_ready=True)
            except grpc.RpcError as error:
                if error.code() in TRANSIENT:
                    self.transient[error.code().name] = self.transient.get(error.code().name, 0) + 1
                else:
                    self.errors.append(f"{error.code().name}: {error.details()}")
                continue
            if dict(response.container_responses[0].envs) != {"EXAMPLE_COM_TOKEN": "item-1,item-3"}:
                self.errors.append(f"wrong answer {response}")
            self.ok += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "an Allocate call hung"
        self._channel.close()


def test_registers_once_per_restart_and_leaks_nothing(plugin_dir: str, daemons: StartDaemon) -> None:
    kubelet = FakeKubelet(plugin_dir, Mode.E2)
    kubelet.start()
    try:
        daemon = daemons(*plugin_args(plugin_dir, f"--count={COUNT}"))
        kubelet.wait_until(advertising(RESOURCE, COUNT, registrations=1))
        # One warm-up cycle with load, so the lazily grown pools exist before the baseline.
        warm_up = _AllocateLoad(plugin_dir)
        kubelet.restart()
        kubelet.wait_until(advertising(RESOURCE, COUNT, registrations=2))
        warm_up.stop()
        start_threads, start_fds = procfs.threads(daemon.pid), procfs.fds(daemon.pid)
        start_targets = procfs.fd_targets(daemon.pid)
        registrations = len(kubelet.register_requests)

        mid_allocate = 0
        for cycle in range(CYCLES):
            under_load = cycle % 4 == 0  # every fourth restart lands among Allocate calls
            load = _AllocateLoad(plugin_dir) if under_load else None
            kubelet.restart()
            kubelet.wait_until(advertising(RESOURCE, COUNT, registrations=registrations + cycle + 1), timeout=15)
            if load is not None:
                load.stop()
                mid_allocate += 1
                assert load.errors == [], load.errors
                assert load.ok > 0
            assert daemon.process.poll() is None, daemon.log()

        assert len(kubelet.register_requests) == registrations + CYCLES  # once per restart
        assert kubelet.register_errors == [] and kubelet.violations == []
        assert mid_allocate == (CYCLES + 3) // 4
        threads = procfs.wait_for(lambda: procfs.threads(daemon.pid), lambda n: n <= start_threads, timeout=10)
        fds = procfs.wait_for(lambda: procfs.fds(daemon.pid), lambda n: n <= start_fds, timeout=10)
        assert threads <= start_threads, f"threads {start_threads} -> {threads}"
        assert fds <= start_fds, f"fds {start_fds} -> {fds}: {start_targets} -> {procfs.fd_targets(daemon.pid)}"
        # Still fully working: a pod is admitted through the last registration.
        assert kubelet.admit("pod", "c", RESOURCE, 2).ids == ("item-0", "item-1")
        log = daemon.log()
        assert "Traceback" not in log and "\nE" not in log, log[-3000:]
    finally:
        kubelet.stop()


def test_one_registration_per_restart_at_the_largest_count(
    plugin_dir: str, kubelets: StartKubelet, daemons: StartDaemon
) -> None:
    """At the largest count a restart keeps the event loop busiest; it must still register
    exactly once per kubelet restart (a second Register harms kubelets 1.25-1.36)."""
    count = tokens.max_count()
    kubelet = kubelets(Mode.E2)
    daemons(*plugin_args(plugin_dir, f"--count={count}"))
    kubelet.wait_until(advertising(RESOURCE, count, registrations=1), timeout=60)
    for restarts in range(1, 6):
        kubelet.restart()
        kubelet.wait_until(advertising(RESOURCE, count, registrations=restarts + 1), timeout=60)
    assert len(kubelet.register_requests) == 6
